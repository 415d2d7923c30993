"""The manager: runs the configured advisors against every server and turns their results into health.

It runs inside ``encapfwd run`` (no separate daemon to forget), in a thread of its own with an asyncio loop:
every (advisor, cluster, port, server) target is probed every ``interval`` seconds, each probe bounded by
``timeout`` — probes run concurrently, so a hung server costs its own timeout and never delays another
probe, and never the forwarding (which happens in the kernel and in the worker processes).

Hysteresis (haproxy's): a server is marked down after ``fall`` failed probes in a row and up again after
``rise`` good ones; until its first change it counts as up. Flap damping: two state changes of one target
are at least ``hold`` seconds apart (the advisor's ``hold``, default 2 s); a verdict that comes sooner is
held (the report shows it as ``held``) and applied when the hold time is over, if the probes since still
call for it. A change wakes the controller (a byte on a
pipe its poll loop watches), which compiles a new plan with the down servers taken out of selection (as
``server down`` would, without touching the file) and hands it to every executor: Maglev keeps the other
servers' slots and the flow tables keep their flows. Health is runtime state only.

Several advisors on one port: a server is down when any of them says so.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Dict, List, Optional, Tuple

from attrs import define, field

from encapfwd.errors import one_line
from encapfwd.model import server_key
from encapfwd.runtime.common import LiveError, WakePipe, log

#: probe latencies kept per target for the report (and the metrics histogram)
LATENCIES_KEPT = 32


@define
class Target:
    """One advisor on one cluster@port@server."""

    name: str  # cluster@port@server
    advisor: str
    port: int  # the port probed (the advisor's)
    address: str
    interval: float
    timeout: float
    rise: int
    fall: int
    options: dict = field(factory=dict)
    via: str = "address"
    vip: str = ""  # the cluster address (probed by via forwarding)
    hold: float = 0.0  # least seconds between two state changes
    last_change: Optional[float] = None  # monotonic time of the last change (None: none yet)
    held: Optional[str] = None  # the state the probes call for while the hold time is not over
    state: str = "unknown"  # unknown (counts as up), up, down
    good: int = 0  # consecutive good probes
    bad: int = 0  # consecutive failed probes
    changes: int = 0
    probes: int = 0  # probes done, cumulative (the latencies kept are the last LATENCIES_KEPT of them)
    since: float = field(factory=time.time)
    last: Optional[dict] = None
    latencies: List[float] = field(factory=list)

    @property
    def key(self) -> Tuple[str, str, int]:
        return (self.name, self.advisor, self.port)

    def record(self, ok: bool, detail: str, latency: float, now: Optional[float] = None) -> bool:
        """Count one probe result; True when the server's state changed."""
        self.probes += 1
        self.last = {"ok": ok, "detail": detail, "latency": round(latency, 6), "at": time.time()}
        self.latencies = (self.latencies + [latency])[-LATENCIES_KEPT:]
        if ok:
            self.good, self.bad = self.good + 1, 0
        else:
            self.bad, self.good = self.bad + 1, 0
        return self.settle(time.monotonic() if now is None else now)

    def wanted(self) -> Optional[str]:
        """The state the probes in a row call for, when it is not the current one."""
        if self.good and self.state != "up" and (self.state == "unknown" or self.good >= self.rise):
            return "up"
        if self.bad and self.state != "down" and self.bad >= self.fall:
            return "down"
        return None

    def held_until(self) -> Optional[float]:
        """When a held verdict may be applied (monotonic), or None."""
        if self.held is None or self.last_change is None:
            return None
        return self.last_change + self.hold

    def settle(self, now: float) -> bool:
        """Apply the state the probes call for unless the hold time since the last change is not over
        (then it is held); True when the state changed."""
        want = self.wanted()
        if want is None:
            self.held = None
            return False
        if self.last_change is not None and now - self.last_change < self.hold:
            self.held = want
            return False
        self.held = None
        return self._change(want, now)

    def _change(self, state: str, now: Optional[float] = None) -> bool:
        counts = self.state != "unknown"  # the first verdict is not a change of health
        self.state = state
        self.since = time.time()
        if counts or state == "down":
            self.changes += 1
            self.last_change = time.monotonic() if now is None else now
            return True
        return False


def targets_of(config, registry) -> List[Target]:
    """Every target of *config*'s advisors (one per advisor × server of a port with its number)."""
    advisors = getattr(config, "advisors", ()) or ()
    types = registry.advisors() if advisors else {}
    out = []
    for adv in advisors:
        if adv.name not in types:
            raise LiveError(f"advisor {adv.name} {adv.port}: no installed plugin provides it")
        for cluster in config.clusters:
            port = cluster.port(adv.port)
            if port is None:
                continue
            for server in port.servers:
                out.append(Target(
                    name=server_key(cluster.address, port.number, server.address), advisor=adv.name,
                    port=adv.port, address=str(server.address), interval=adv.interval, timeout=adv.timeout,
                    rise=adv.rise, fall=adv.fall, options=dict(adv.options), via=adv.via,
                    vip=str(cluster.address), hold=float(getattr(adv, "hold", 0.0)),
                ))
    return out


class HealthManager:
    """The advisors' loop in a thread; :meth:`down` is what the controller takes out of selection.

    *forwarding* (a :class:`~.through.ForwardingProber`) runs the ``via forwarding`` probes; without it they
    fail (the live engine sets it).
    """

    def __init__(self, config, registry, forwarding=None):
        self.registry = registry
        self.forwarding = forwarding
        self._lock = threading.Lock()
        self._targets: Dict[tuple, Target] = {}
        self._pipe = WakePipe()
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._thread: Optional[threading.Thread] = None
        self._tasks: Dict[tuple, asyncio.Task] = {}
        self._stopping = False
        self.update(config)

    # -- the controller's side

    def fileno(self) -> int:
        """Readable when a server's health changed (the controller then calls :meth:`drain`)."""
        return self._pipe.fileno()

    def drain(self) -> None:
        self._pipe.drain()

    def update(self, config) -> None:
        """Take a new configuration: keep the state of targets that stay, start new ones, stop old ones."""
        fresh = {t.key: t for t in targets_of(config, self.registry)}
        with self._lock:
            for key, target in fresh.items():
                old = self._targets.get(key)
                if old is not None:
                    target.state, target.good, target.bad = old.state, old.good, old.bad
                    target.changes, target.since, target.last = old.changes, old.since, old.last
                    target.latencies, target.probes = old.latencies, old.probes
                    target.last_change, target.held = old.last_change, old.held
            self._targets = fresh
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._sync_tasks)

    def down(self, config=None) -> Dict[str, str]:
        """``{cluster@port@server: reason}`` for every server an advisor holds down. With *config*: only
        the verdicts of advisors *config* still has, on servers it still has (a stopped advisor's verdicts,
        or those of a server or port that went, count no more — on the very reload that removes them)."""
        keys = None if config is None else {t.key for t in targets_of(config, self.registry)}
        out = {}
        with self._lock:
            for t in self._targets.values():
                if keys is not None and t.key not in keys:
                    continue
                if t.state == "down":
                    out.setdefault(t.name, f"{t.advisor} {t.port}: {t.last['detail'] if t.last else 'down'}")
        return out

    def snapshot(self) -> Dict[str, dict]:
        """The report's ``health``: per server, its state and each advisor's last result."""
        out: Dict[str, dict] = {}
        with self._lock:
            for t in self._targets.values():
                row = out.setdefault(t.name, {"state": "up", "advisors": {}})
                row["advisors"][f"{t.advisor} {t.port}"] = {
                    "state": t.state, "last": t.last, "changes": t.changes, "since": round(t.since, 3),
                    "latencies": list(t.latencies), "probes": t.probes, "held": t.held, "hold": t.hold,
                }
                if t.state == "down":
                    row["state"] = "down"
                elif t.state == "unknown" and row["state"] != "down":
                    row["state"] = "unknown"
            for row in out.values():  # one advisor's figures at the top level (the first), for tools
                first = next(iter(row["advisors"].items()))
                row["advisor"] = first[0].split()[0]
                row["last"] = first[1]["last"]
                row["changes"] = sum(a["changes"] for a in row["advisors"].values())
                row["since"] = max(a["since"] for a in row["advisors"].values())
                row["latencies"] = first[1]["latencies"]
                row["probes"] = first[1]["probes"]
        return out

    def start(self) -> None:
        if self._thread is None and self._targets:
            self._thread = threading.Thread(target=self._run, name="encapfwd-manager", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stopping = True
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(5)
        self._pipe.close()

    # -- the manager's thread

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.call_soon(self._sync_tasks)
            loop.run_forever()
        finally:
            for task in self._tasks.values():
                task.cancel()
            try:
                loop.run_until_complete(asyncio.gather(*self._tasks.values(), return_exceptions=True))
            except Exception:  # noqa: BLE001 - shutting down
                pass
            if self.forwarding is not None:
                self.forwarding.close()
            loop.close()

    def _sync_tasks(self) -> None:
        with self._lock:
            wanted = dict(self._targets)
        for key in list(self._tasks):
            if key not in wanted:
                self._tasks.pop(key).cancel()
        for key in wanted:
            if key not in self._tasks:
                self._tasks[key] = self._loop.create_task(self._probe_forever(key))

    async def _probe_forever(self, key) -> None:
        types = self.registry.advisors()
        next_probe = time.monotonic()
        while not self._stopping:
            with self._lock:
                target = self._targets.get(key)
            if target is None:
                return
            if time.monotonic() >= next_probe:
                started = time.monotonic()
                ok, detail, latency = await _probe(types.get(target.advisor), target, self.forwarding)
                next_probe = started + target.interval
                with self._lock:
                    current = self._targets.get(key)
                    changed = current is not None and current.record(ok, detail, latency)
            else:  # a held verdict whose hold time is over
                with self._lock:
                    current = self._targets.get(key)
                    changed = current is not None and current.settle(time.monotonic())
            if changed:
                detail = (current.last or {}).get("detail", "")
                log(f"advisor {current.advisor} {current.port}: server {current.name} is {current.state} "
                    f"({detail})")
                self._pipe.wake()
            wake = next_probe
            with self._lock:
                current = self._targets.get(key)
                until = current.held_until() if current is not None else None
            if until is not None:
                wake = min(wake, until)
            await asyncio.sleep(max(0.0, wake - time.monotonic()))


async def _probe(kind, target: Target, forwarding=None) -> Tuple[bool, str, float]:
    """One probe, bounded by the target's timeout; never raises."""
    started = time.monotonic()
    if kind is None:
        return False, f"advisor {target.advisor} is not installed", 0.0
    if target.via == "forwarding":
        if forwarding is None:
            return False, "via forwarding runs in encapfwd run only", 0.0
        probe = forwarding.connect(target.name, target.vip, target.port, target.timeout)
    else:
        probe = kind.probe(target.address, target.port, target.options, target.timeout)
    try:
        result = await asyncio.wait_for(probe, target.timeout + 0.5)
        return bool(result.ok), one_line(result.detail, None, first=True) if result.detail else "", float(result.latency)
    except asyncio.TimeoutError:
        return False, "timeout", time.monotonic() - started
    except Exception as exc:  # noqa: BLE001 - a probe's bug is a failed probe
        return False, one_line(f"{type(exc).__name__}: {exc}", None, first=True), time.monotonic() - started


def with_health(config, down: Dict[str, str]):
    """*config* with the servers the advisors hold down marked down (not written anywhere)."""
    if not down:
        return config
    import attrs

    clusters = []
    for cluster in config.clusters:
        ports = []
        for port in cluster.ports:
            servers = tuple(
                attrs.evolve(s, down=True) if server_key(cluster.address, port.number, s.address) in down else s
                for s in port.servers
            )
            ports.append(attrs.evolve(port, servers=servers))
        clusters.append(attrs.evolve(cluster, ports=tuple(ports)))
    return attrs.evolve(config, clusters=tuple(clusters))


__all__ = ["HealthManager", "Target", "targets_of", "with_health"]
