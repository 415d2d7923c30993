"""A small HTTP/1.x server with hard bounds, for ``encapfwd run --metrics`` (standard library only).

Every resource a client can hold is bounded, so that a slow or hostile client costs one slot for at most
the deadline and never delays the dispatcher or the other scrapers:

- **one thread** runs a ``selectors`` loop over non-blocking sockets (no thread per connection); the
  answers are computed by one more thread (:attr:`BoundedHTTPServer.handler`, e.g. a scrape that asks the
  controller), one request at a time;
- **a cap on connections** (:data:`MAX_CONNECTIONS`): a connection beyond it is answered ``503`` with
  ``Retry-After`` at once and closed (at most :data:`MAX_REFUSING` such answers in flight; beyond that the
  connection is closed without one);
- **a large listen backlog** (:data:`BACKLOG`, capped by the kernel's ``somaxconn``) that the loop drains
  as fast as connections come, so bursts do not overflow it;
- **deadlines per connection, in total** (not per byte): the request line and headers must be complete
  within :data:`REQUEST_TIMEOUT` seconds of the connection (else ``408``); the whole exchange — request,
  answer computed, answer taken by the client — ends :data:`DEADLINE` seconds after the connection at the
  latest (an answer not computed by then is ``503``, one not taken is cut off);
- **a bounded request**: at most :data:`MAX_REQUEST` bytes of request line and headers (else ``431``); a
  request line without a version (HTTP/0.9) or with a version other than HTTP/1.0 and 1.1 is answered at
  once (``400``/``505``), never waited on; only ``GET`` and ``HEAD`` (else ``405``);
- one request per connection (``Connection: close``).
"""

from __future__ import annotations

import os
import queue
import select
import socket
import threading
import time
from typing import Callable, Dict, Optional, Tuple

#: connections served at once (reading, waiting for the answer, or writing)
MAX_CONNECTIONS = 16
#: connections being refused (503 written, then closed) at once
MAX_REFUSING = 256
#: the listen backlog (the kernel caps it at net.core.somaxconn)
BACKLOG = 1024
#: seconds from the connection to the end of its request line and headers
REQUEST_TIMEOUT = 5.0
#: seconds from the connection to the end of the exchange, at most
DEADLINE = 15.0
#: bytes of request line and headers, at most
MAX_REQUEST = 8192
#: seconds a refused connection is kept to read what its client sends, so the 503 is not lost to a reset
REFUSE_LINGER = 1.0

REASONS = {200: "OK", 400: "Bad Request", 405: "Method Not Allowed", 408: "Request Timeout",
           431: "Request Header Fields Too Large", 500: "Internal Server Error", 503: "Service Unavailable",
           505: "HTTP Version Not Supported"}

#: ``handler(method, path, headers) -> (status, [(name, value)…], body)``; headers' names in lower case
Handler = Callable[[str, str, Dict[str, str]], Tuple[int, list, bytes]]


class _Conn:
    __slots__ = ("sock", "fd", "data", "out", "state", "deadline", "request_deadline", "head")

    def __init__(self, sock: socket.socket, now: float, deadline: float, request_timeout: float):
        self.sock = sock
        self.fd = sock.fileno()
        self.data = b""
        self.out = b""
        self.state = "reading"  # reading, waiting (for the handler), writing, refusing, lingering
        self.deadline = now + deadline
        self.request_deadline = now + request_timeout
        self.head = False


def response(status: int, body: bytes = b"", headers=(), head: bool = False) -> bytes:
    """A complete HTTP/1.1 answer that closes the connection."""
    lines = [f"HTTP/1.1 {status} {REASONS.get(status, 'Status')}"]
    names = {name.lower() for name, _ in headers}
    lines += [f"{name}: {value}" for name, value in headers]
    if "content-type" not in names:
        lines.append("Content-Type: text/plain; charset=utf-8")
    lines += [f"Content-Length: {len(body)}", "Connection: close"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (b"" if head else body)


def _error(status: int, text: str, head: bool = False, extra=()) -> bytes:
    return response(status, (text.rstrip("\n") + "\n").encode(), extra, head)


class BoundedHTTPServer:
    """See the module's text. :meth:`serve_forever` in a thread of its own; :meth:`shutdown` from another;
    :meth:`server_close` at the end. :attr:`socket` is the listening socket."""

    def __init__(self, sockaddr, family: int, handler: Handler, *, max_connections: int = MAX_CONNECTIONS,
                 backlog: int = BACKLOG, request_timeout: float = REQUEST_TIMEOUT, deadline: float = DEADLINE,
                 max_request: int = MAX_REQUEST, clock: Callable[[], float] = time.monotonic):
        self.handler = handler
        self.max_connections = max_connections
        self.request_timeout = request_timeout
        self.deadline = max(deadline, request_timeout)
        self.max_request = max_request
        self.clock = clock
        self.socket = socket.socket(family, socket.SOCK_STREAM)
        try:
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                try:
                    self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
                except OSError:
                    pass
            self.socket.bind(sockaddr)
            self.socket.listen(backlog)
        except OSError:
            self.socket.close()
            raise
        self.socket.setblocking(False)
        self.server_address = self.socket.getsockname()
        self.connections: Dict[int, _Conn] = {}
        self.stats = {"requests": 0, "refused": 0, "timeouts": 0, "bad_requests": 0}
        self._jobs: "queue.Queue[Optional[_Conn]]" = queue.Queue()
        self._done: "queue.Queue[Tuple[_Conn, bytes]]" = queue.Queue()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._stopping = False
        self._stopped = threading.Event()
        self._worker = threading.Thread(target=self._work, name="encapfwd-metrics-scrape", daemon=True)
        self._worker.start()

    # -- life

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        try:
            while not self._stopping:
                now = self.clock()
                self._expire(now)
                poller = select.poll()
                poller.register(self.socket.fileno(), select.POLLIN)
                poller.register(self._wake_r, select.POLLIN)
                timeout = poll_interval
                for conn in self.connections.values():
                    if conn.state in ("reading", "lingering"):
                        poller.register(conn.fd, select.POLLIN)
                    elif conn.state in ("writing", "refusing"):
                        poller.register(conn.fd, select.POLLOUT)
                    nearest = conn.request_deadline if conn.state == "reading" else conn.deadline
                    timeout = min(timeout, max(0.0, nearest - now))
                for fd, _event in poller.poll(int(timeout * 1000) + 1):
                    if fd == self.socket.fileno():
                        self._accept()
                    elif fd == self._wake_r:
                        self._collect()
                    else:
                        conn = self.connections.get(fd)
                        if conn is None:
                            continue
                        if conn.state == "reading":
                            self._read(conn)
                        elif conn.state == "lingering":
                            self._linger(conn)
                        elif conn.state in ("writing", "refusing"):
                            self._write(conn)
                self._collect()
        finally:
            self._stopped.set()

    def shutdown(self) -> None:
        self._stopping = True
        self._wake()
        self._stopped.wait(5)

    def server_close(self) -> None:
        self._stopping = True
        self._jobs.put(None)
        for conn in list(self.connections.values()):
            self._close(conn)
        self._close_own()

    def forget(self) -> None:
        """In a forked child: close our descriptors, nothing else (the threads do not exist there)."""
        for conn in list(self.connections.values()):
            try:
                conn.sock.close()
            except OSError:
                pass
        self._close_own()

    def _close_own(self) -> None:
        """The wake pipe and the listening socket."""
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass
        try:
            self.socket.close()
        except OSError:
            pass

    # -- inside the loop

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"!")
        except OSError:
            pass

    def _accept(self) -> None:
        for _ in range(256):  # bounded per round: deadlines are looked at in between
            try:
                sock, _ = self.socket.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # EMFILE and friends: the next round
                return
            sock.setblocking(False)
            now = self.clock()
            serving = sum(1 for c in self.connections.values() if c.state not in ("refusing", "lingering"))
            if serving >= self.max_connections:
                self.stats["refused"] += 1
                refusing = len(self.connections) - serving
                if refusing >= MAX_REFUSING:
                    sock.close()
                    continue
                conn = _Conn(sock, now, REFUSE_LINGER * 2, REFUSE_LINGER * 2)
                conn.state = "refusing"
                conn.out = _error(503, f"busy: {self.max_connections} connections are served at once; try again",
                                  extra=[("Retry-After", "1")])
                self.connections[conn.fd] = conn
                self._write(conn)
                continue
            conn = _Conn(sock, now, self.deadline, self.request_timeout)
            self.connections[conn.fd] = conn

    def _read(self, conn: _Conn) -> None:
        try:
            chunk = conn.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(conn)
            return
        if not chunk:
            if conn.data.strip():
                self._reply(conn, _error(400, "bad request: the connection ended before the request did"))
            else:
                self._close(conn)
            return
        conn.data += chunk
        self._parse(conn)

    def _parse(self, conn: _Conn) -> None:
        data = conn.data
        end = data.find(b"\n")
        if end < 0:
            if len(data) > self.max_request:
                self.stats["bad_requests"] += 1
                self._reply(conn, _error(431, f"request line longer than {self.max_request} bytes"))
            return
        words = data[:end].decode("latin-1").strip().split()
        head = bool(words) and words[0] == "HEAD"
        conn.head = head
        if len(words) != 3:  # HTTP/0.9 ("GET /metrics") or garbage: answered at once, never waited on
            self.stats["bad_requests"] += 1
            what = "HTTP/0.9 requests are not supported" if len(words) == 2 else "malformed request line"
            self._reply(conn, _error(400, f"bad request: {what} (send GET /metrics HTTP/1.1)", head))
            return
        method, target, version = words
        if version not in ("HTTP/1.0", "HTTP/1.1"):
            self.stats["bad_requests"] += 1
            self._reply(conn, _error(505 if version.startswith("HTTP/") else 400,
                                     f"unsupported protocol version {version[:20]!r}", head))
            return
        if method not in ("GET", "HEAD"):
            self.stats["bad_requests"] += 1
            self._reply(conn, _error(405, f"method {method[:20]!r} not allowed (GET, HEAD)", head,
                                     [("Allow", "GET, HEAD")]))
            return
        stop = data.find(b"\r\n\r\n")
        stop = data.find(b"\n\n") if stop < 0 else stop
        if stop < 0:
            if len(data) > self.max_request:
                self.stats["bad_requests"] += 1
                self._reply(conn, _error(431, f"request headers longer than {self.max_request} bytes", head))
            return
        if stop > self.max_request:
            self.stats["bad_requests"] += 1
            self._reply(conn, _error(431, f"request headers longer than {self.max_request} bytes", head))
            return
        headers: Dict[str, str] = {}
        for line in data[end + 1:stop].decode("latin-1").splitlines():
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        self.stats["requests"] += 1
        conn.state = "waiting"
        conn.data = b""
        self._jobs.put((conn, method, target, headers))

    def _reply(self, conn: _Conn, data: bytes) -> None:
        conn.state, conn.out, conn.data = "writing", data, b""
        self._write(conn)

    def _write(self, conn: _Conn) -> None:
        try:
            sent = conn.sock.send(conn.out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(conn)
            return
        conn.out = conn.out[sent:]
        if conn.out:
            return
        if conn.state == "refusing":  # read what the client sends for a moment, so it gets the 503
            try:
                conn.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            conn.state = "lingering"
            return
        self._close(conn, graceful=True)

    def _linger(self, conn: _Conn) -> None:
        try:
            chunk = conn.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            chunk = b""
        if not chunk:
            self._close(conn)

    def _collect(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except OSError:
            pass
        while True:
            try:
                conn, data = self._done.get_nowait()
            except queue.Empty:
                return
            if self.connections.get(conn.fd) is conn and conn.state == "waiting":
                self._reply(conn, data)

    def _expire(self, now: float) -> None:
        for conn in list(self.connections.values()):
            if conn.state == "reading" and now >= conn.request_deadline:
                self.stats["timeouts"] += 1
                self._reply(conn, _error(408, f"request not complete within {self.request_timeout:g} s"))
            elif now >= conn.deadline:
                if conn.state == "waiting":
                    self.stats["timeouts"] += 1
                    conn.state = "writing"  # the handler's late answer is dropped
                    try:
                        conn.sock.send(_error(503, f"no answer within {self.deadline:g} s", conn.head))
                    except OSError:
                        pass
                self._close(conn)

    def _close(self, conn: _Conn, graceful: bool = False) -> None:
        self.connections.pop(conn.fd, None)
        if graceful:
            try:
                conn.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
        try:
            conn.sock.close()
        except OSError:
            pass

    # -- the handler's thread

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            conn, method, target, headers = job
            if self.clock() >= conn.deadline:  # cut off already: not worth computing
                continue
            try:
                status, extra, body = self.handler(method, target, headers)
                data = response(status, body, extra, head=method == "HEAD")
            except Exception as exc:  # noqa: BLE001 - a handler's bug is a 500, never a dead server
                data = _error(500, f"{type(exc).__name__}: {exc}", method == "HEAD")
            self._done.put((conn, data))
            self._wake()


__all__ = ["BACKLOG", "BoundedHTTPServer", "DEADLINE", "MAX_CONNECTIONS", "MAX_REQUEST", "REQUEST_TIMEOUT",
           "response"]
