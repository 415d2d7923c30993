"""A tiny HTTP/1.1 server for lab back-ends (standard library only; runs inside namespaces and UML guests).

``python3 httpd.py --name ipip --port 80`` answers every GET with ``server=<name> client=<addr>:<port>
local=<addr>`` and keeps connections alive, so a test can tell which back-end answered, from which
address the reply left (the VIP), and can hold one connection open across a dispatcher reload. A POST
(an upload) is answered the same, with ``got=<bytes> sha256=<digest of the body>`` after it.
"""

import argparse
import hashlib
import http.server
import socket
import socketserver


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "encapfwd-lab"

    def do_GET(self):
        local = self.connection.getsockname()[0].replace("::ffff:", "")
        client = self.client_address[0].replace("::ffff:", "")
        body = f"server={self.server.lab_name} client={client}:{self.client_address[1]} local={local}\n"
        if self.path.startswith("/big"):
            body += "x" * 20000 + "\n"
        data = body.encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):
        length = int(self.headers.get("Content-Length") or 0)
        digest = hashlib.sha256()
        got = 0
        while got < length:
            chunk = self.rfile.read(min(1 << 16, length - got))
            if not chunk:
                break
            digest.update(chunk)
            got += len(chunk)
        local = self.connection.getsockname()[0].replace("::ffff:", "")
        client = self.client_address[0].replace("::ffff:", "")
        data = (f"server={self.server.lab_name} client={client}:{self.client_address[1]} local={local} "
                f"got={got} sha256={digest.hexdigest()}\n").encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True


class Server6(Server):
    address_family = socket.AF_INET6  # dual-stack: IPv4 clients arrive as ::ffff:a.b.c.d


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--name", required=True)
    parser.add_argument("--port", type=int, default=80)
    parser.add_argument("--bind", default="::")
    args = parser.parse_args()
    try:
        server = (Server6 if ":" in args.bind else Server)((args.bind, args.port), Handler)
    except OSError:  # a kernel without IPv6
        server = Server(("0.0.0.0", args.port), Handler)
    server.lab_name = args.name
    server.serve_forever()


if __name__ == "__main__":
    main()
