"""Messages between the controller and its worker processes: length-prefixed pickles over a socketpair.

Both ends are this program (the worker is a fork of the controller), so pickle is safe here; nothing
from outside ever reaches these sockets.
"""

from __future__ import annotations

import pickle
import socket
import struct


def send_msg(sock: socket.socket, obj) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    sock.sendall(struct.pack("!I", len(data)) + data)


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError
        buf += chunk
    return bytes(buf)


def recv_msg(sock: socket.socket):
    (length,) = struct.unpack("!I", recv_exact(sock, 4))
    return pickle.loads(recv_exact(sock, length))
