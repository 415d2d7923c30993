"""Scale-out: announce the cluster addresses over BGP with ExaBGP while this dispatcher can forward them.

``encapfwd run`` starts ExaBGP (the ``bgp`` extra: ``pip install 'encapfwd[bgp]'``) as its child when the
executor has a ``bgppeer``, and drives it through ExaBGP's process API: ExaBGP runs
:mod:`.bgp_relay`, which connects back to a unix socket of this process. The controller says what it
wants announced (:meth:`Speaker.want`: every cluster address with at least one server that is up, while
the data plane is attached) and the speaker sends the difference, ``announce route VIP/32 next-hop NFA``
or ``withdraw route …``. Each one is acknowledged by ExaBGP (``exabgp.api.ack``).

What a router sees when:
- the dispatcher stops (SIGTERM): every route is withdrawn and acknowledged, the data plane keeps
  forwarding for ``drain`` seconds while the router moves the flows, then ExaBGP closes the session.
- the dispatcher is killed: ExaBGP dies with it (``PR_SET_PDEATHSIG``); the kernel closes the TCP session,
  and the router drops the routes at once. If the whole machine dies, the router's hold timer does it
  (``bgpholdtime``, 3 s at the least).
- ExaBGP dies alone: the controller starts it again (1 s, 2 s … 30 s apart) and announces again.

Logging: state changes only — the session coming up, an established session going down, each route
announced or withdrawn. While the peer cannot be reached (refused, no route), ExaBGP retries about twice a
second: the first failed attempt is one line, then one line a minute with how many failed
(:data:`ATTEMPTS_SUMMARY`), never a line per attempt.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional

from encapfwd.runtime.common import LiveError, log

#: seconds the data plane keeps forwarding after the routes were withdrawn (the router's FIB update)
DEFAULT_DRAIN = 1.0
ENV_DRAIN = "ENCAPFWD_BGP_DRAIN"
#: longest wait for ExaBGP to acknowledge the withdrawals at stop
ACK_TIMEOUT = 3.0
PR_SET_PDEATHSIG = 1
#: seconds ExaBGP may run without its relay connected (at start, or after the relay died) before it is ended
RELAY_GRACE = 10.0
#: seconds between two lines summing up failed session attempts while the session is not up
ATTEMPTS_SUMMARY = 60.0


def exabgp_path() -> Optional[str]:
    """The ``exabgp`` console script beside this interpreter, else on PATH."""
    beside = Path(sys.executable).parent / "exabgp"
    if beside.exists():
        return str(beside)
    return shutil.which("exabgp")


def exabgp_config(ex, relay_socket: str) -> str:
    """ExaBGP's configuration for executor *ex* (its bgp* keywords): one neighbour, our relay as process."""
    router_id = ex.bgprouterid or ex.nfa
    local = ex.nfa or router_id
    return (
        "process encapfwd {\n"
        f"    run {sys.executable} -m encapfwd.bgp.relay {relay_socket};\n"
        "    encoder text;\n"
        "}\n\n"
        f"neighbor {ex.bgppeer} {{\n"
        f"    router-id {router_id};\n"
        f"    local-address {local};\n"
        f"    local-as {ex.bgpasn};\n"
        f"    peer-as {ex.bgppeerasn};\n"
        f"    hold-time {ex.bgpholdtime};\n"
        + ("    family {\n        ipv4 unicast;\n        ipv6 unicast;\n    }\n" if ex.bgpnexthop6 else "")
        + "    api {\n"
        "        processes [ encapfwd ];\n"
        "        receive { parsed; notification; }\n"
        "        neighbor-changes;\n"
        "    }\n"
        "}\n"
    )


def exabgp_env() -> Dict[str, str]:
    """ExaBGP's settings as environment (no file under /etc): stay in the foreground as root, no CLI pipes,
    no listening socket, acknowledgements on, our process not respawned by ExaBGP (we restart ExaBGP)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("exabgp.")}
    env.update({
        "exabgp.daemon.user": "root",
        "exabgp.daemon.drop": "false",
        "exabgp.daemon.daemonize": "false",
        "exabgp.daemon.pid": "",
        "exabgp.api.cli": "false",
        "exabgp.api.ack": "true",
        "exabgp.api.respawn": "true",
        "exabgp.tcp.bind": "",
        "exabgp.log.destination": "stdout",
        "exabgp.log.level": "INFO",
        "exabgp.log.short": "true",
    })
    return env


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except Exception:  # noqa: BLE001 - best effort; the hold timer still ends the session
        pass


def prefix_of(address) -> str:
    return f"{address}/{32 if address.version == 4 else 128}"


class Speaker:
    """ExaBGP, supervised: what is announced follows :meth:`want`; see the module's text."""

    def __init__(self, executor):
        self.ex = executor
        self.exabgp = exabgp_path()
        if self.exabgp is None:
            raise LiveError(
                f"executor bgppeer {executor.bgppeer} is set but ExaBGP is not installed: "
                "pip install 'encapfwd[bgp]' (or 'executor set bgppeer none')"
            )
        self.drain = float(os.environ.get(ENV_DRAIN, DEFAULT_DRAIN) or 0)
        self.nexthop = str(executor.bgpnexthop or executor.nfa)
        self.nexthop6 = str(executor.bgpnexthop6) if executor.bgpnexthop6 else None
        self.dir: Optional[str] = None
        self.proc: Optional[subprocess.Popen] = None
        self._listener: Optional[socket.socket] = None
        self._conn: Optional[socket.socket] = None
        self._lock = threading.Lock()
        self._acks = threading.Condition(self._lock)
        self.acked = 0  # acknowledgements received on this connection
        self.sent = 0  # commands sent on this connection
        self.errors = 0  # commands ExaBGP refused
        self.wanted: Dict[str, str] = {}  # prefix -> next hop
        self.announced: Dict[str, str] = {}  # what this speaker's session was told
        self.session = "idle"
        self.failed_attempts = 0  # attempts that ended before the session was up (cumulative)
        self._attempts_logged = 0  # failed_attempts when the last line about them was written
        self._attempts_since = 0.0  # when that line was written
        self.restarts = 0
        self._next_start = 0.0
        self._backoff = 1.0
        self.stopping = False
        self._since = time.monotonic()  # since when ExaBGP runs without a relay

    # -- life

    def start(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="encapfwd-bgp-")
        path = os.path.join(self.dir, "api.sock")
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(path)
        self._listener.listen(4)
        conf = os.path.join(self.dir, "exabgp.conf")
        Path(conf).write_text(exabgp_config(self.ex, path))
        threading.Thread(target=self._accept, name="encapfwd-bgp", daemon=True).start()
        self._spawn()

    def _spawn(self) -> None:
        conf = os.path.join(self.dir, "exabgp.conf")
        logfile = open(os.path.join(self.dir, "exabgp.log"), "ab")
        argv = [self.exabgp, "server", conf]
        setpriv = shutil.which("setpriv")  # util-linux: sets the death signal, then execs (thread-safe)
        try:
            self.proc = subprocess.Popen(
                ["setpriv", "--pdeathsig", "KILL", "--", *argv] if setpriv else argv, env=exabgp_env(),
                stdin=subprocess.DEVNULL, stdout=logfile, stderr=subprocess.STDOUT,
                preexec_fn=None if setpriv else _die_with_parent, close_fds=True,
            )
        finally:
            logfile.close()
        self._since = time.monotonic()
        log(f"bgp: ExaBGP {self.proc.pid} speaks to {self.ex.bgppeer} (AS {self.ex.bgpasn} → "
            f"{self.ex.bgppeerasn}, hold {self.ex.bgpholdtime} s, next hop {self.nexthop})")

    def poll(self) -> None:
        """Called from the controller's loop: start ExaBGP again when it died (with a growing pause)."""
        if self.stopping or self.proc is None:
            return
        code = self.proc.poll()
        if code is None:
            # ExaBGP without our relay would keep announcing what nobody can withdraw: end it
            if self._conn is None and time.monotonic() - self._since > RELAY_GRACE:
                log(f"bgp: ExaBGP {self.proc.pid} has no relay to this controller; ending it")
                self.proc.kill()
            return
        now = time.monotonic()
        if not self._next_start:
            log(f"bgp: ExaBGP exited ({code}): {self.log_tail(1)}; starting it again in {self._backoff:g} s")
            self._next_start = now + self._backoff
            self._backoff = min(self._backoff * 2, 30.0)
            with self._lock:
                self.announced = {}
                self.session = "down"
        elif now >= self._next_start:
            self._next_start = 0.0
            self.restarts += 1
            self._spawn()

    def log_tail(self, lines: int = 5) -> str:
        try:
            text = Path(self.dir, "exabgp.log").read_text(errors="replace").strip().splitlines()
        except (OSError, TypeError):
            return ""
        return " | ".join(text[-lines:])

    def stop(self) -> float:
        """Withdraw everything (acknowledged), keep forwarding for the drain time (the caller's data plane
        is still attached), then end ExaBGP; returns the seconds the withdrawals took."""
        started = time.monotonic()
        self.want({})
        self.wait_acked(ACK_TIMEOUT)
        took = time.monotonic() - started
        self.stopping = True
        if self.drain > 0 and self.proc is not None and self.proc.poll() is None:
            time.sleep(self.drain)
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # ExaBGP closes the session with a CEASE notification
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        for sock in (self._conn, self._listener):
            if sock is not None:
                try:
                    sock.close()
                except OSError:
                    pass
        if self.dir:
            shutil.rmtree(self.dir, ignore_errors=True)
        return took

    # -- what is announced

    def want(self, routes: Dict[str, str]) -> None:
        """Announce exactly *routes* (prefix → next hop): send the difference when the relay is there."""
        with self._lock:
            self.wanted = dict(routes)
            self._sync()

    def routes_for(self, plan) -> Dict[str, str]:
        """Every cluster address of *plan* with at least one server up and weighted (prefix → next hop)."""
        live = {s.cluster for s in plan.servers if s.up and s.weight > 0}
        out = {}
        for cluster in plan.config.clusters:
            nexthop = self.nexthop if cluster.address.version == 4 else self.nexthop6
            if str(cluster.address) in live and nexthop:
                out[prefix_of(cluster.address)] = nexthop
        return out

    def _sync(self) -> None:  # with the lock
        if self._conn is None:
            return
        lines = []
        for prefix in sorted(set(self.announced) - set(self.wanted)):
            lines.append(f"withdraw route {prefix} next-hop {self.announced[prefix]}")
        for prefix, nexthop in sorted(self.wanted.items()):
            if self.announced.get(prefix) != nexthop:
                lines.append(f"announce route {prefix} next-hop {nexthop}")
        if not lines:
            return
        try:
            self._conn.sendall("".join(line + "\n" for line in lines).encode())
        except OSError:
            return  # the relay is gone: the next connection announces everything
        self.sent += len(lines)
        self.announced = dict(self.wanted)
        for line in lines:
            log(f"bgp: {line}")

    def wait_acked(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self._acks:
            while self._conn is not None and self.acked < self.sent:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._acks.wait(left)
        return True

    # -- the relay's connection (a thread)

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                if self._conn is not None:
                    self._conn.close()
                self._conn, self.sent, self.acked = conn, 0, 0
                self.announced = {}
                self._sync()
            threading.Thread(target=self._read, args=(conn,), name="encapfwd-bgp-relay", daemon=True).start()

    def _read(self, conn: socket.socket) -> None:
        buffer = b""
        while True:
            try:
                data = conn.recv(65536)
            except OSError:
                data = b""
            if not data:
                with self._acks:
                    if self._conn is conn:
                        self._conn = None
                        self._since = time.monotonic()
                        self.announced = {}
                        self.session = "down"
                    self._acks.notify_all()
                return
            buffer += data
            *lines, buffer = buffer.split(b"\n")
            with self._acks:
                for raw in lines:
                    self._on_line(raw.decode(errors="replace").strip())
                self._acks.notify_all()

    def _on_line(self, line: str) -> None:  # with the lock
        if line in ("done", "error"):
            self.acked += 1
            if line == "error":
                self.errors += 1
                log("bgp: ExaBGP refused a command")
            return
        words = line.split()
        # neighbour changes (text encoder): "neighbor 10.0.2.254 up|down|connected …"
        if len(words) >= 3 and words[0] == "neighbor" and words[2] in ("up", "down", "connected"):
            self._session_event(words[1], words[2])

    def _session_event(self, peer: str, state: str) -> None:  # with the lock
        """Log the session's state changes, not every attempt (see the module's text)."""
        was, self.session = self.session, state
        now = time.monotonic()
        if state == "up":
            self._backoff = 1.0
            if was != "up":
                failed = self.failed_attempts - self._attempts_logged
                log(f"bgp: session with {peer} up" + (f" (after {failed} more failed attempts)" if failed else ""))
            self.failed_attempts = self._attempts_logged = 0
            return
        if was == "up":  # the established session went: a state change
            log(f"bgp: session with {peer} {state}")
            self._attempts_since = now
            return
        if state != "down":  # "connected" while not up: part of an attempt
            return
        self.failed_attempts += 1
        if self.failed_attempts == 1:
            log(f"bgp: session with {peer} not up (attempt failed); ExaBGP keeps trying "
                f"(failed attempts are summed up every {ATTEMPTS_SUMMARY:g} s)")
            self._attempts_logged, self._attempts_since = 1, now
        elif now - self._attempts_since >= ATTEMPTS_SUMMARY:
            failed = self.failed_attempts - self._attempts_logged
            log(f"bgp: session with {peer} still not up: {failed} failed attempts in the last "
                f"{now - self._attempts_since:.0f} s")
            self._attempts_logged, self._attempts_since = self.failed_attempts, now

    def snapshot(self) -> dict:
        with self._lock:
            return {
                "peer": str(self.ex.bgppeer), "asn": self.ex.bgpasn, "peer_asn": self.ex.bgppeerasn,
                "router_id": str(self.ex.bgprouterid or self.ex.nfa), "next_hop": self.nexthop,
                "next_hop6": self.nexthop6,
                "hold_time": self.ex.bgpholdtime, "session": self.session,
                "speaker_pid": self.proc.pid if self.proc is not None and self.proc.poll() is None else None,
                "announced": sorted(self.announced), "wanted": sorted(self.wanted), "restarts": self.restarts,
                "errors": self.errors, "failed_attempts": self.failed_attempts,
            }


def bgp_settings(ex) -> tuple:
    """The executor keywords a running speaker depends on (a change restarts it)."""
    return (ex.bgppeer, ex.bgpasn, ex.bgppeerasn, ex.bgprouterid, ex.bgpnexthop, ex.bgpnexthop6, ex.bgpholdtime,
            ex.nfa)


__all__: List[str] = ["Speaker", "bgp_settings", "exabgp_config", "exabgp_env", "exabgp_path"]
