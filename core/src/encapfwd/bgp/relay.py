"""The process ExaBGP runs for ``encapfwd run`` (its process API): a pipe between ExaBGP and the controller.

ExaBGP starts it as ``python -m encapfwd.bgp.relay SOCKET``; it connects to the controller's unix
socket and copies socket → stdout (``announce route …`` / ``withdraw route …`` for ExaBGP) and stdin →
socket (ExaBGP's ``done``/``error`` acknowledgements and neighbour changes). ExaBGP closes inherited
descriptors when it spawns a process, hence a path. It exits as soon as either side closes: when ExaBGP dies
the controller sees the socket close; when the controller dies ExaBGP sees its process end. Standard
library only (it runs beside every speaker).
"""

from __future__ import annotations

import os
import selectors
import socket
import sys
import time


def main(path: str) -> int:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    for _ in range(100):
        try:
            sock.connect(path)
            break
        except OSError:
            time.sleep(0.05)
    else:
        sys.stderr.write(f"encapfwd bgp relay: cannot connect to {path}\n")
        return 1
    selector = selectors.DefaultSelector()
    selector.register(0, selectors.EVENT_READ, "exabgp")
    selector.register(sock, selectors.EVENT_READ, "controller")
    while True:
        for key, _ in selector.select():
            try:
                if key.data == "exabgp":
                    data = os.read(0, 65536)
                    if not data:
                        return 0
                    sock.sendall(data)
                else:
                    data = sock.recv(65536)
                    if not data:
                        return 0
                    os.write(1, data)
            except OSError:
                return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]) if len(sys.argv) == 2 else 2)
