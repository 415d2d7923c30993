"""The control socket of ``encapfwd run``: where it lives, its server and its client.

Standard library only (no engine, no pyroute2, no scapy): ``encapfwd server report`` imports
:func:`query_control` from here.

- **Where:** ``--control PATH``, else ``$ENCAPFWD_CONTROL``, else ``/run/encapfwd/netns-INODE.sock`` where
  INODE identifies the network namespace (``stat /proc/self/ns/net``; ``ip netns identify`` uses the same),
  so dispatchers in different namespaces never share a default, and ``encapfwd server report`` run in the
  same namespace finds its dispatcher by the same rule.
- **Claiming the path** (:func:`claim_path`): only a *stale* socket (a socket nobody accepts connections on)
  is removed; a regular file, a directory, a symbolic link, another dispatcher's socket or anybody else's
  live socket is left alone and the start is refused with one line.
- **Serving** (:class:`ControlServer`): non-blocking, driven by the controller's own poll loop — each client
  is a small state (bytes read so far, the answer still to write, a deadline). A request is at most
  :data:`MAX_REQUEST` bytes and must be complete within :data:`REQUEST_TIMEOUT` seconds of the connection
  (in total, not per byte); at most :data:`MAX_CLIENTS` are served at once, and more get an explicit
  ``{"error": "busy: …"}`` (the listen backlog, :data:`LISTEN_BACKLOG`, holds a burst of 8 × that many
  connections until the loop takes them, so a client sees "busy", never ``EAGAIN``). Connections from the
  dispatcher's own process (its metrics server, which has a cap of its own) are not counted against the
  cap. A slow or hostile client therefore never delays reloads, worker restarts or other clients; it is cut
  off at its deadline.
- **Answers that take time** (a ``reload`` waiting for neighbour resolution): the handler returns a
  :class:`Deferred`; the client waits (the loop goes on serving others) until the owner resolves it, at
  most :data:`DEFERRED_TIMEOUT` seconds.
- **Protocol:** one JSON line ``{"command": "report"}`` (or ``ping``, ``reload``; a bare word works too);
  the answer is one JSON object, then the server closes the connection.
"""

from __future__ import annotations

import errno
import json
import os
import select
import socket
import stat
import struct
import time
from typing import Callable, Dict, List, Optional, Tuple

# the exceptions live with the others (encapfwd.errors); importable from here as before
from encapfwd.errors import ControlBusy, ControlError, ForeignAnswer, NoAnswer

CONTROL_DIR = "/run/encapfwd"
ENV_CONTROL = "ENCAPFWD_CONTROL"
#: the largest request accepted (bytes, newline included)
MAX_REQUEST = 64 * 1024
#: a client must have sent its whole request this many seconds after connecting (and has as long again to
#: read the answer)
REQUEST_TIMEOUT = 2.0
#: clients served at the same time; more are answered "busy" and closed
MAX_CLIENTS = 32
#: connections the kernel queues before the loop accepts them: a burst of this many gets an answer
#: (served, or "busy"), not EAGAIN on connect
LISTEN_BACKLOG = 8 * MAX_CLIENTS
#: longest wait for an answer that comes later (a reload waiting for neighbour resolution)
DEFERRED_TIMEOUT = 30.0
#: the answer to a client beyond MAX_CLIENTS
BUSY = "busy: too many control connections; try again"


class Deferred:
    """An answer the control handler gives later: return one from the handler, then :meth:`resolve` it
    (from the owner's loop) with the answer."""

    def __init__(self) -> None:
        self.done = False
        self.answer: Optional[dict] = None
        self._callbacks: List[Callable[[dict], None]] = []

    def add(self, callback: Callable[[dict], None]) -> None:
        if self.done:
            callback(self.answer)
        else:
            self._callbacks.append(callback)

    def resolve(self, answer: dict) -> None:
        if self.done:
            return
        self.done, self.answer = True, answer
        callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback(answer)


# --------------------------------------------------------------------------------------------- where


def netns_inode() -> Optional[int]:
    """The inode of this process's network namespace, or None when /proc does not tell."""
    try:
        return os.stat("/proc/self/ns/net").st_ino
    except OSError:
        return None


def default_control_path() -> str:
    """``$ENCAPFWD_CONTROL``, else ``/run/encapfwd/netns-INODE.sock`` for this network namespace (else
    ``/run/encapfwd/control.sock`` when /proc is not mounted)."""
    env = os.environ.get(ENV_CONTROL)
    if env:
        return env
    inode = netns_inode()
    if inode is None:
        return os.path.join(CONTROL_DIR, "control.sock")
    return os.path.join(CONTROL_DIR, f"netns-{inode}.sock")


# -------------------------------------------------------------------------------------------- client


def query_control(path: Optional[str] = None, command: str = "report", timeout: float = 5.0) -> dict:
    """Ask a running ``encapfwd run`` for *command* (``report``, ``ping``, ``reload``) over its control
    socket (*path*, default :func:`default_control_path`); *timeout* bounds the whole exchange.

    Raises OSError when nothing listens at *path* (FileNotFoundError, ConnectionRefusedError), only root
    may open it (PermissionError) or it does not answer in time (:class:`NoAnswer`, a TimeoutError);
    ValueError on a bad answer or an error reply — :class:`ForeignAnswer` when the answer is not a JSON
    object (not a dispatcher), :class:`ControlBusy` when the dispatcher is busy (it answered "busy", or its
    listen queue stayed full for the whole *timeout*).
    """
    path = path or default_control_path()
    deadline = time.monotonic() + timeout
    while True:  # a full listen queue (EAGAIN) is a busy dispatcher: try again until the deadline
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(max(0.001, deadline - time.monotonic()))
        try:
            sock.connect(path)
            break
        except (BlockingIOError, InterruptedError) as exc:
            sock.close()
            if exc.errno not in (errno.EAGAIN, errno.EINTR) or time.monotonic() >= deadline:
                raise ControlBusy(f"{BUSY} (the listen queue of {path} stayed full for {timeout:g} s)") from None
            time.sleep(0.01)
        except BaseException:
            sock.close()
            raise
    with sock:
        try:
            sock.sendall(json.dumps({"command": command}).encode() + b"\n")
            sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):  # it answered (e.g. "busy") and closed already
            pass
        except OSError as exc:
            if exc.errno != errno.ENOTCONN:
                raise
        chunks = []
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise NoAnswer(errno.ETIMEDOUT, f"no answer on {path} within {timeout:g} s")
            sock.settimeout(remaining)
            try:
                chunk = sock.recv(65536)
            except socket.timeout:
                raise NoAnswer(errno.ETIMEDOUT, f"no answer on {path} within {timeout:g} s") from None
            except ConnectionResetError:  # closed with some of our request unread: what came is the answer
                chunk = b""
            if not chunk:
                break
            chunks.append(chunk)
    if not chunks:
        raise NoAnswer(errno.ECONNRESET, f"{path} closed the connection without an answer")
    try:
        answer = json.loads(b"".join(chunks).decode() or "null")
    except (ValueError, RecursionError) as exc:
        raise ForeignAnswer(f"the control socket gave no JSON: {type(exc).__name__}") from None
    if not isinstance(answer, dict):
        raise ForeignAnswer("the control socket gave no JSON object")
    if "error" in answer and len(answer) == 1:
        if str(answer["error"]).startswith("busy"):
            raise ControlBusy(answer["error"])
        raise ValueError(answer["error"])
    return answer


def probe(path: str, timeout: float = 5.0) -> str:
    """What is at *path*: ``"absent"``, ``"stale"`` (a socket nobody listens on), ``"encapfwd"`` (a
    dispatcher answers) or ``"other"`` (something else accepts connections, or connecting failed for
    another reason such as permissions)."""
    try:
        answer = query_control(path, "ping", timeout=timeout)
    except FileNotFoundError:
        return "absent"
    except ConnectionRefusedError:  # a socket file nobody listens on
        return "stale"
    except OSError:
        return "other"
    except ForeignAnswer:  # no JSON object: somebody else
        return "other"
    except ValueError:  # an error reply ("permission denied", "busy") is still a dispatcher's
        return "encapfwd"
    return "encapfwd" if "pong" in answer else "other"


def claim_path(path: str) -> None:
    """Make *path* free for a new control socket. Nothing there: fine. A stale socket: removed. Anything
    else (a regular file, a directory, a symbolic link, a socket somebody answers on) is left in place and
    :class:`ControlError` says why."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise ControlError(f"cannot use {path} for the control socket: {exc.strerror}") from None
    if not stat.S_ISSOCK(st.st_mode):
        if stat.S_ISDIR(st.st_mode):
            kind = "a directory"
        elif stat.S_ISLNK(st.st_mode):
            kind = "a symbolic link"
        elif stat.S_ISREG(st.st_mode):
            kind = "a regular file"
        else:
            kind = "not a socket"
        raise ControlError(
            f"{path} exists and is {kind}, not a stale control socket: left in place; "
            "remove it or pass --control PATH"
        )
    state = probe(path)
    if state == "encapfwd":
        raise ControlError(f"another encapfwd run answers on {path}; stop it or pass --control PATH")
    if state == "other":
        raise ControlError(
            f"{path} is a socket in use by another program (or not ours to probe): left in place; "
            "pass --control PATH"
        )
    if state == "stale":
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise ControlError(f"cannot remove the stale control socket {path}: {exc.strerror}") from None


# -------------------------------------------------------------------------------------------- server


def parse_request(data: bytes) -> Tuple[Optional[str], Optional[str]]:
    """``(command, None)`` or ``(None, error)`` for one request line. Accepts ``{"command": "…"}``, a JSON
    string, or a bare word; an empty request means ``report``. Never raises."""
    try:
        text = data.decode("utf-8").strip()
        if not text:
            return "report", None
        try:
            request = json.loads(text)
        except RecursionError:
            return None, "bad request: nested too deeply"
        except ValueError:
            return text, None  # a bare word, e.g. "ping"
        if isinstance(request, dict):
            command = request.get("command", "report")
        else:
            command = request
        if not isinstance(command, str):
            return None, 'bad request: expected {"command": "report" | "ping" | "reload"}'
        return command, None
    except UnicodeDecodeError:
        return None, "bad request: not UTF-8"
    except (ValueError, RecursionError, MemoryError) as exc:
        return None, f"bad request: {type(exc).__name__}"


class _Client:
    __slots__ = ("sock", "fd", "data", "out", "deadline", "waiting")

    def __init__(self, sock: socket.socket, deadline: float):
        self.sock = sock
        self.fd = sock.fileno()
        self.data = b""
        self.out: Optional[bytes] = None  # the answer still to write; None while reading
        self.deadline = deadline
        self.waiting = False  # the handler's answer comes later (a Deferred)


class ControlServer:
    """The control socket, served from the owner's poll loop without ever blocking it.

    The owner calls :meth:`open` once, then in its loop registers :meth:`poll_set`, waits at most
    :meth:`timeout_ms`, hands every ready descriptor to :meth:`handle` (False: not ours) and calls
    :meth:`expire`; :meth:`close` at the end. *handler(command) -> dict* computes an answer (it runs in the
    owner's loop: reports and reloads are the owner's own work).
    """

    def __init__(
        self,
        path: str,
        handler: Callable[[str], dict],
        *,
        max_request: int = MAX_REQUEST,
        timeout: float = REQUEST_TIMEOUT,
        max_clients: int = MAX_CLIENTS,
        log: Optional[Callable[[str], None]] = None,
        clock: Callable[[], float] = time.monotonic,
        own_process_uncapped: bool = False,
    ):
        self.path = path
        #: connections from this very process (the dispatcher's metrics server, capped on its side) are
        #: never refused as busy
        self.own_process_uncapped = own_process_uncapped
        self.handler = handler
        self.max_request = max_request
        self.timeout = timeout
        self.max_clients = max_clients
        self.log = log or (lambda message: None)
        self.clock = clock
        self.listener: Optional[socket.socket] = None
        self.clients: Dict[int, _Client] = {}
        self._identity: Optional[Tuple[int, int]] = None
        self.stats = {"requests": 0, "bad_requests": 0, "timeouts": 0, "refused": 0}

    # -- life

    def open(self) -> None:
        """Claim the path (:func:`claim_path`), bind it mode 0600 in a directory created 0700, listen."""
        path = self.path
        directory = os.path.dirname(path) or "."
        try:
            os.makedirs(directory, mode=0o700, exist_ok=True)
        except OSError as exc:
            raise ControlError(f"cannot create {directory} for the control socket: {exc.strerror}") from None
        if not os.path.isdir(directory):
            raise ControlError(f"{directory} is not a directory (control socket {path})")
        claim_path(path)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        bound = False
        try:
            listener.bind(path)
            bound = True
            os.chmod(path, 0o600)
            st = os.stat(path)
            listener.listen(LISTEN_BACKLOG)
        except OSError as exc:
            listener.close()
            if bound:
                try:
                    os.unlink(path)
                except OSError:
                    pass
            raise ControlError(f"cannot listen on {path}: {exc.strerror or exc}") from None
        finally:
            os.umask(old)
        listener.setblocking(False)
        self._identity = (st.st_dev, st.st_ino)
        self.listener = listener

    def close(self) -> None:
        """Close every connection and the listener; remove the socket file if it is still ours."""
        self.forget()
        if self._identity is not None:
            try:
                st = os.lstat(self.path)
                if (st.st_dev, st.st_ino) == self._identity:
                    os.unlink(self.path)
            except OSError:
                pass
            self._identity = None

    def forget(self) -> None:
        """Close our descriptors without touching the socket file (in a forked worker)."""
        for client in list(self.clients.values()):
            self._drop(client, drain=False)  # never read a client's bytes in a forked child
        if self.listener is not None:
            try:
                self.listener.close()
            except OSError:
                pass
            self.listener = None

    # -- the owner's loop

    def poll_set(self) -> List[Tuple[int, int]]:
        out = []
        if self.listener is not None:
            out.append((self.listener.fileno(), select.POLLIN))
        for client in self.clients.values():
            if not client.waiting:
                out.append((client.fd, select.POLLIN if client.out is None else select.POLLOUT))
        return out

    def timeout_ms(self, now: Optional[float] = None, longest: int = 1000) -> int:
        """Milliseconds until the nearest client deadline (at most *longest*)."""
        if not self.clients:
            return longest
        now = self.clock() if now is None else now
        nearest = min(client.deadline for client in self.clients.values())
        return max(0, min(longest, int((nearest - now) * 1000) + 1))

    def expire(self, now: Optional[float] = None) -> None:
        """Cut off every client past its deadline."""
        now = self.clock() if now is None else now
        for client in list(self.clients.values()):
            if now >= client.deadline:
                if client.waiting:
                    self.stats["timeouts"] += 1
                    self._try_send(client.sock, {"error": f"no answer within {DEFERRED_TIMEOUT:g} s"})
                    self._drop(client)
                    continue
                if client.out is None:
                    # what arrived while the owner was busy (a reload, a report) still counts as in time
                    self._read(client)
                    if client.fd not in self.clients or client.out is not None:
                        continue
                self.stats["timeouts"] += 1
                if client.out is None:
                    self._try_send(client.sock, {"error": f"request not complete within {self.timeout} s"})
                self._drop(client)

    def handle(self, fd: int, events: int = select.POLLIN) -> bool:
        """Serve a ready descriptor; False when it is not one of ours."""
        if self.listener is not None and fd == self.listener.fileno():
            self._accept()
            return True
        client = self.clients.get(fd)
        if client is None:
            return False
        if client.waiting:
            return True
        if client.out is None:
            self._read(client)
        else:
            self._write(client)
        return True

    # -- inside

    def _accept(self) -> None:
        for _ in range(64):  # bounded: never starve the owner's loop
            try:
                conn, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and friends: try again at the next wake-up
                self.log(f"control socket: accept failed: {exc.strerror or exc}")
                return
            conn.setblocking(False)
            try:
                creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
                pid, uid, _gid = struct.unpack("3i", creds)
            except OSError:
                conn.close()
                continue
            # our own process (the metrics server: capped on its side) is never refused as busy
            if len(self.clients) >= self.max_clients and not (self.own_process_uncapped and pid == os.getpid()):
                self.stats["refused"] += 1
                self._try_send(conn, {"error": BUSY})
                self._close_drained(conn)
                continue
            if uid not in (0, os.geteuid()):
                self.stats["refused"] += 1
                self._try_send(conn, {"error": "permission denied"})
                conn.close()
                continue
            client = _Client(conn, self.clock() + self.timeout)
            self.clients[client.fd] = client

    def _read(self, client: _Client) -> None:
        while True:  # until the socket is drained, the request complete or too large: bounded
            try:
                chunk = client.sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self._drop(client)
                return
            if not chunk:  # the client closed its side: what it sent is the request
                request = client.data
                break
            client.data += chunk
            end = client.data.find(b"\n")
            if end >= 0:
                request = client.data[:end]
                break
            if len(client.data) >= self.max_request:
                self.stats["bad_requests"] += 1
                self._answer(client, {"error": f"request too large (at most {self.max_request} bytes)"})
                return
        if len(request) >= self.max_request:
            self.stats["bad_requests"] += 1
            self._answer(client, {"error": f"request too large (at most {self.max_request} bytes)"})
            return
        command, error = parse_request(request)
        if error is not None:
            self.stats["bad_requests"] += 1
            self._answer(client, {"error": error})
            return
        self.stats["requests"] += 1
        try:
            answer = self.handler(command)
        except Exception as exc:  # noqa: BLE001 - a request never stops the dispatcher
            self.log(f"control request {command[:40]!r} failed: {type(exc).__name__}: {exc}")
            answer = {"error": f"{type(exc).__name__}: {exc}"}
        if isinstance(answer, Deferred):
            client.waiting = True
            client.deadline = self.clock() + DEFERRED_TIMEOUT
            answer.add(lambda result, client=client: self._later(client, result))
            return
        self._answer(client, answer)

    def _later(self, client: _Client, answer: dict) -> None:
        """A deferred answer is ready: write it, if the client is still there."""
        if self.clients.get(client.fd) is client and client.waiting:
            client.waiting = False
            self._answer(client, answer)

    def _answer(self, client: _Client, answer: dict) -> None:
        try:
            data = json.dumps(answer, default=str).encode()
        except (TypeError, ValueError, RecursionError) as exc:
            data = json.dumps({"error": f"cannot encode the answer: {type(exc).__name__}"}).encode()
        client.out = data
        client.deadline = self.clock() + self.timeout
        self._write(client)

    def _write(self, client: _Client) -> None:
        try:
            sent = client.sock.send(client.out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(client)
            return
        client.out = client.out[sent:]
        if not client.out:
            self._drop(client)

    @staticmethod
    def _try_send(sock: socket.socket, answer: dict) -> None:
        try:
            sock.send(json.dumps(answer).encode())
        except OSError:
            pass

    @staticmethod
    def _close_drained(sock: socket.socket) -> None:
        """Close after discarding what the peer sent already (bounded, non-blocking): closing with unread
        data would turn the answer just sent into ECONNRESET at the peer."""
        try:
            for _ in range(4):
                if not sock.recv(65536):
                    break
        except OSError:
            pass
        try:
            sock.close()
        except OSError:
            pass

    def _drop(self, client: _Client, drain: bool = True) -> None:
        self.clients.pop(client.fd, None)
        if drain:
            try:
                # discard a little unread input (bounded, non-blocking): closing with unread data would turn
                # the client's end-of-answer into ECONNRESET
                for _ in range(4):
                    if not client.sock.recv(65536):
                        break
            except OSError:
                pass
        try:
            client.sock.close()
        except OSError:
            pass


__all__ = [
    "BUSY",
    "CONTROL_DIR",
    "ControlBusy",
    "ControlError",
    "ControlServer",
    "DEFERRED_TIMEOUT",
    "Deferred",
    "ENV_CONTROL",
    "LISTEN_BACKLOG",
    "MAX_CLIENTS",
    "NoAnswer",
    "MAX_REQUEST",
    "REQUEST_TIMEOUT",
    "claim_path",
    "default_control_path",
    "netns_inode",
    "parse_request",
    "probe",
    "query_control",
]
