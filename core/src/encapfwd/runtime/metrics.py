"""Prometheus metrics of ``encapfwd run`` (``--metrics HOST:PORT``), served with ``prometheus_client``.

How the counters are sampled (thread safety): :meth:`Controller.report` is *not* thread-safe — it sends
``("report",)`` on every worker's channel and reads the answers, and the controller's poll loop reads the same
channels (a worker's death, late replies). The HTTP server runs in threads of its own, so a scrape never calls
``report()``: the collector asks the controller over its own **control socket**
(:func:`~encapfwd.control.query_control`, exactly what ``encapfwd server report`` does). The control
socket is served by the controller's poll loop, which wakes at once on the connection, so every scrape gets a
fresh report computed in the main loop, between two other pieces of its work — no cache, no hook in the loop,
no lock shared with it. A scrape therefore equals a ``server report`` taken at the same moment. Each scrape
counts as one request in the report's ``engine.control_requests``. When the controller does not answer within
:data:`SCRAPE_TIMEOUT` seconds (or at all) the scrape fails with HTTP 503 and one line; counters are never
made up. Health comes from the same report: every server's ``state`` there is the installed plan's (``down``
in the configuration, held down by an advisor, or unresolved MAC, with its ``reason``), so the metrics, the
report and the forwarding agree by construction; nothing else is read from the controller.

The HTTP server (:mod:`.httpd`) has hard bounds: one thread and non-blocking sockets, at most
:data:`~.httpd.MAX_CONNECTIONS` connections served at once (more are answered ``503`` at once), a listen backlog
of :data:`~.httpd.BACKLOG`, and a total deadline per connection (the request within
:data:`~.httpd.REQUEST_TIMEOUT` seconds, the whole exchange within :data:`~.httpd.DEADLINE`).

Nothing here imports ``prometheus_client`` (or anything but the standard library) at import time:
``live.py`` imports this module whether ``--metrics`` is given or not.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import threading
from typing import Callable, Dict, Iterable, List, Optional, Tuple

from encapfwd.errors import MetricsError  # defined with the other exceptions; importable from here too
from encapfwd.runtime.common import log, one_line

#: seconds a scrape waits for the controller's report (a reload or a stuck worker can delay it)
SCRAPE_TIMEOUT = 5.0
#: seconds an HTTP client may take to send its whole request (a total, not per byte: engines/httpd.py)
HTTP_TIMEOUT = 5.0
#: default host of ``--metrics :PORT``
DEFAULT_HOST = "127.0.0.1"
#: upper bounds (seconds) of the probe latency histogram built from lists of recent latencies
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

SERVER_LABELS = ("cluster", "port", "server", "method")
PROBE_LABELS = ("cluster", "port", "server", "advisor")


# ------------------------------------------------------------------------------------- --metrics


def parse_address(text: str) -> Tuple[str, int]:
    """``(host, port)`` from ``HOST:PORT``, ``[IPV6]:PORT`` or ``:PORT`` (host 127.0.0.1). HOST is an IPv4
    address, a bracketed IPv6 address or a name (resolved when the server starts); ``0.0.0.0`` or ``[::]``
    listen on every address. Raises :class:`MetricsError` with one line."""
    raw = text
    text = (text or "").strip()
    usage = "expected HOST:PORT, [IPV6]:PORT or :PORT (e.g. 127.0.0.1:9464)"
    if text.startswith("["):
        end = text.find("]")
        if end < 0 or text[end + 1 : end + 2] != ":":
            raise MetricsError(f"--metrics {raw!r}: {usage}")
        host, port_text = text[1:end], text[end + 2 :]
        try:
            host = str(ipaddress.IPv6Address(host))
        except ValueError:
            raise MetricsError(f"--metrics {raw!r}: {host!r} is not an IPv6 address") from None
    else:
        if ":" not in text:
            raise MetricsError(f"--metrics {raw!r}: {usage}")
        host, port_text = text.rsplit(":", 1)
        if ":" in host:
            raise MetricsError(f"--metrics {raw!r}: an IPv6 address goes in brackets, e.g. [::1]:9464")
        host = host or DEFAULT_HOST
        if not _valid_host(host):
            raise MetricsError(f"--metrics {raw!r}: {host!r} is not an IPv4 address or a host name")
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise MetricsError(f"--metrics {raw!r}: the port must be a number from 1 to 65535")
    return host, int(port_text)


def _valid_host(host: str) -> bool:
    try:
        ipaddress.IPv4Address(host)
        return True
    except ValueError:
        pass
    if host.replace(".", "").isdigit():
        return False  # 999.1.2.3, 10.0.0: not an address, and not a name either
    labels = host.rstrip(".").split(".")
    return len(host) <= 253 and all(
        0 < len(label) <= 63 and label[0] != "-" and label[-1] != "-"
        and all(c.isalnum() or c == "-" for c in label) and label.isascii()
        for label in labels
    )


def check_available() -> None:
    """Raise :class:`MetricsError` when ``prometheus_client`` is not installed."""
    import importlib.util

    if importlib.util.find_spec("prometheus_client") is None:
        raise MetricsError(
            "--metrics needs the prometheus_client package: pip install 'encapfwd[live]' "
            "(or pip install prometheus_client)"
        )


# ------------------------------------------------------------------------------------ the metrics


def _num(value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return 0.0
    return float(value)


def _labels_of(name: str, row: Optional[dict] = None) -> Tuple[str, str, str]:
    """``(cluster, port, server)`` of the server *name* (``cluster@port@server``; addresses, IPv6 ones
    too, have no ``@``). Taken from the name rather than the report row's fields: the controller sums the
    numbers of its units' reports, so with several units (the XDP program and a worker, or two workers)
    the row's ``port`` is a sum, not the port."""
    parts = str(name).split("@")
    if len(parts) == 3:
        return parts[0], parts[1], parts[2]
    row = row or {}
    return str(row.get("cluster", name)), str(row.get("port", "")), str(row.get("server", ""))


class LatencyHistograms:
    """Cumulative probe latency histograms kept across scrapes, from the report's lists of recent latencies.

    The health manager keeps the last N latencies of every (server, advisor) and the report carries them
    (a sliding window); a Prometheus histogram must only grow. Every scrape therefore adds the latencies
    that are new since the previous scrape: those after the ``probes`` count seen last time when the report
    carries a cumulative ``probes`` count, else those after the longest overlap of the previous window's end
    with the new window's start. More than N probes between two scrapes lose the oldest of them (the
    window no longer holds them). Not thread-safe: the collector calls it under its lock.
    """

    def __init__(self, buckets: Iterable[float] = LATENCY_BUCKETS):
        self.bounds = tuple(sorted(float(b) for b in buckets))
        #: key -> [window seen last, probes seen last, per-bucket counts (+Inf last), sum]
        self.state: Dict[tuple, list] = {}

    def update(self, key: tuple, window: List[float], probes: Optional[int] = None) -> Tuple[list, float]:
        """Add what is new in *window*; ``([(le, cumulative count)…, ("+Inf", count)], sum)``."""
        window = [float(v) for v in window if isinstance(v, (int, float)) and not isinstance(v, bool)]
        state = self.state.get(key)
        if state is None:
            state = self.state[key] = [[], None, [0] * (len(self.bounds) + 1), 0.0]
        seen, seen_probes, counts, total = state
        if isinstance(probes, int) and isinstance(seen_probes, int) and probes >= seen_probes:
            fresh = min(len(window), probes - seen_probes)
            new = window[len(window) - fresh:] if fresh else []
        else:
            new = window[self._overlap(seen, window):]
        for value in new:
            i = 0
            while i < len(self.bounds) and value > self.bounds[i]:
                i += 1
            counts[i] += 1
            total += value
        state[0], state[1], state[3] = window, probes if isinstance(probes, int) else None, total
        return self._cumulative(counts), total

    @staticmethod
    def _overlap(seen: List[float], window: List[float]) -> int:
        """How many leading values of *window* are the trailing values of *seen* (the longest overlap)."""
        for k in range(min(len(seen), len(window)), 0, -1):
            if seen[len(seen) - k:] == window[:k]:
                return k
        return 0

    def _cumulative(self, counts: List[int]) -> list:
        out, running = [], 0
        for bound, count in zip(self.bounds, counts):
            running += count
            out.append((_le(bound), running))
        out.append(("+Inf", running + counts[-1]))
        return out

    def forget_except(self, keys) -> None:
        for key in [k for k in self.state if k not in keys]:
            del self.state[key]


def _le(bound: float) -> str:
    return repr(float(bound)) if bound != int(bound) else f"{float(bound):.1f}"


def _given_buckets(value) -> Optional[Tuple[list, float]]:
    """A histogram the report already carries: ``{"buckets": {le: cumulative} | [[le, cumulative], …],
    "sum": seconds, "count": n}`` (cumulative since the manager started); None when *value* is not one."""
    if not isinstance(value, dict) or "buckets" not in value:
        return None
    raw = value["buckets"]
    pairs = list(raw.items()) if isinstance(raw, dict) else list(raw or ())
    buckets = []
    for pair in pairs:
        try:
            le, count = pair
            bound = float("inf") if str(le) in ("+Inf", "inf", "Inf") else float(le)
            buckets.append((bound, int(count)))
        except (TypeError, ValueError):
            return None
    buckets.sort()
    count = int(_num(value.get("count", buckets[-1][1] if buckets else 0)))
    out = [(_le(b), c) for b, c in buckets if b != float("inf")]
    out.append(("+Inf", max([count] + [c for _, c in buckets])))
    return out, _num(value.get("sum", 0.0))


def _probe_rows(health: dict):
    """``(server name, advisor, latencies, probes)`` for every advisor of every server in *health*: the
    per-advisor rows (``health[name]["advisors"]["http 80"]``) when present, else the server's own
    ``latencies`` under its ``advisor`` name."""
    for name, row in health.items():
        if not isinstance(row, dict):
            continue
        advisors = row.get("advisors")
        if isinstance(advisors, dict) and advisors:
            for advisor, arow in advisors.items():
                if isinstance(arow, dict) and arow.get("latencies") is not None:
                    yield name, str(advisor), arow["latencies"], arow.get("probes")
        elif row.get("latencies") is not None:
            yield name, str(row.get("advisor") or ""), row["latencies"], row.get("probes")


def metric_families(report: dict, configured_up: Optional[Dict[str, bool]] = None,
                    histograms: Optional[LatencyHistograms] = None) -> list:
    """The metric families of one controller *report* (see docs/live.md, "Metrics").

    *configured_up*: ``{cluster@port@server: False}`` for servers ``down`` in the configuration (missing:
    up). *histograms* keeps the probe latency histograms across scrapes (a fresh one: this report only).
    """
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

    configured_up = configured_up or {}
    histograms = histograms if histograms is not None else LatencyHistograms()
    servers = report.get("servers") or {}
    engine = report.get("engine") or {}
    flows = report.get("flows") or {}
    health = report.get("health") if isinstance(report.get("health"), dict) else None
    connections = flows.get("connections") if isinstance(flows.get("connections"), dict) else None

    packets = CounterMetricFamily("encapfwd_server_packets_total",
                                  "Packets forwarded to the server (kernel and slow path).",
                                  labels=SERVER_LABELS)
    nbytes = CounterMetricFamily("encapfwd_server_bytes_total",
                                 "Bytes of the forwarded packets (as received) sent to the server.",
                                 labels=SERVER_LABELS)
    up = GaugeMetricFamily("encapfwd_server_health",
                           "1 when the server takes new flows (not down in the configuration, not held down "
                           "by an advisor; not probed yet counts as up), else 0.", labels=SERVER_LABELS)
    active = GaugeMetricFamily("encapfwd_server_active_flows",
                               "Flows the workers' flow tables hold for the server.", labels=SERVER_LABELS)
    for name in sorted(servers):
        row = servers[name] or {}
        labels = [*_labels_of(name, row), str(row.get("method", ""))]
        packets.add_metric(labels, _num(row.get("packets")))
        nbytes.add_metric(labels, _num(row.get("bytes")))
        if row.get("state") in ("up", "down"):  # the installed plan's own view (engines/live.py)
            healthy = row["state"] == "up"
        else:
            state = ((health or {}).get(name) or {}).get("state") if health is not None else None
            healthy = configured_up.get(name, True) and state != "down"
        up.add_metric(labels, 1.0 if healthy else 0.0)
        if connections is not None:
            active.add_metric(labels, _num(connections.get(name, 0)))
    families = [packets, nbytes, up]
    if connections is not None:
        families.append(active)

    drops = CounterMetricFamily("encapfwd_drops_total", "Packets dropped, by reason (docs/datapath.md).",
                                labels=["reason"])
    for reason, count in sorted((report.get("drops") or {}).items()):
        drops.add_metric([str(reason)], _num(count))
    families.append(drops)

    def counter(name: str, doc: str, value) -> None:
        family = CounterMetricFamily(name, doc)
        family.add_metric([], _num(value))
        families.append(family)

    counter("encapfwd_engine_rx_frames_total", "Frames the AF_PACKET workers received.", engine.get("rx"))
    counter("encapfwd_engine_tx_frames_total", "Frames the AF_PACKET workers sent.", engine.get("tx"))
    counter("encapfwd_engine_ring_drops_total",
            "Frames lost at the AF_PACKET rings: dropped by the kernel (RX ring full) plus not sent "
            "(TX ring full).", _num(engine.get("kernel_drops")) + _num(engine.get("tx_ring_full")))
    counter("encapfwd_engine_gso_dropped_total",
            "Buffers of several segments merged by GRO or a sender's TSO that the AF_PACKET workers dropped "
            "(they forward single frames; the TC program forwards such buffers).", engine.get("gso_dropped"))
    counter("encapfwd_xdp_forwarded_total",
            "Packets the kernel program (XDP, or the same program at tc ingress) forwarded in the kernel.",
            engine.get("xdp_forwarded"))
    counter("encapfwd_xdp_tx_lost_total",
            "Frames the interface's driver could not send (the XDP program's XDP_TX frames among them), "
            "never counted as forwarded.", engine.get("xdp_tx_lost"))
    counter("encapfwd_xdp_passed_total",
            "Cluster frames the kernel program (XDP or TC) handed up to the slow path (AF_PACKET workers).",
            engine.get("xdp_passed"))
    counter("encapfwd_xdp_dropped_total", "Packets the kernel program (XDP or TC) dropped.",
            engine.get("xdp_dropped"))
    if "xdp_pressure_placed" in engine or "xdp_handup_placed" in engine:
        placed = CounterMetricFamily("encapfwd_xdp_flows_placed_total",
                                     "New flows of wrr/wlc ports the kernel program placed itself by the port's "
                                     "weighted table: under pressure, or beyond executor handuplimit hand-ups "
                                     "per CPU and second.", labels=["why"])
        placed.add_metric(["pressure"], _num(engine.get("xdp_pressure_placed")))
        placed.add_metric(["handup-limit"], _num(engine.get("xdp_handup_placed")))
        families.append(placed)
    counter("encapfwd_reloads_total", "Configurations reloaded (SIGHUP, control reload, neighbour change).",
            engine.get("reloads"))
    counter("encapfwd_reload_failures_total", "Reloads that failed (the running configuration stayed).",
            engine.get("reload_errors"))

    info = GaugeMetricFamily("encapfwd_info", "Always 1: the engine, interface and plan of this dispatcher.",
                             labels=["engine", "interface", "plan_digest", "selection_digest"])
    info.add_metric([str(engine.get("engine") or ""), str(engine.get("interface") or ""),
                     str(engine.get("plan_digest") or ""), str(engine.get("selection_digest") or "")], 1.0)
    families.append(info)

    bgp = report.get("bgp")
    if isinstance(bgp, dict):  # scale-out (docs/scale-out.md)
        session = GaugeMetricFamily("encapfwd_bgp_session_up", "1 while the BGP session with the peer is up.",
                                    labels=["peer"])
        session.add_metric([str(bgp.get("peer", ""))], 1.0 if bgp.get("session") == "up" else 0.0)
        announced = GaugeMetricFamily("encapfwd_bgp_announced_routes",
                                      "Cluster addresses this dispatcher announces (1 each).", labels=["prefix"])
        for prefix in bgp.get("announced") or ():
            announced.add_metric([str(prefix)], 1.0)
        families += [session, announced]
        counter("encapfwd_bgp_speaker_restarts_total", "Times ExaBGP was started again after it died.",
                bgp.get("restarts"))
    overload = report.get("overload")
    if isinstance(overload, dict) and (overload.get("episodes") or overload.get("engaged")):
        # overload (runtime/overload.py): only once this dispatcher has been overloaded at least once
        families += overload_families(overload, engine)
    if isinstance(report.get("sync"), dict):  # flow synchronisation (engines/flowsync.py)
        from encapfwd.flowsync.service import metric_families as sync_families

        families += sync_families(report["sync"])

    if health is not None:
        latency = HistogramMetricFamily("encapfwd_probe_latency_seconds",
                                        "Advisor probe latency (seconds).", labels=PROBE_LABELS)
        keys = set()
        for name, advisor, latencies, probes in _probe_rows(health):
            cluster, port, server = _labels_of(name)
            given = _given_buckets(latencies)
            if given is None:
                if not isinstance(latencies, (list, tuple)):
                    continue
                keys.add((name, advisor))
                given = histograms.update((name, advisor), list(latencies), probes)
            buckets, total = given
            latency.add_metric([cluster, port, server, advisor], buckets, total)
        histograms.forget_except(keys)
        if latency.samples:
            families.append(latency)
    return families


def overload_families(overload: dict, engine: dict) -> list:
    """``encapfwd_overload`` (gauge: 1 while the slow path is overloaded, labelled with what is done:
    ``kernel`` pressure mode or ``workers`` triage alone), ``encapfwd_overload_episodes_total`` and
    ``encapfwd_overload_dropped_total`` (new connections the workers shed, per ``cluster``/``port``) from
    the report's ``overload`` and the workers' summed ``overload_dropped`` (docs/live.md, "Overload")."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    gauge = GaugeMetricFamily("encapfwd_overload",
                              "1 while the slow path cannot keep up (the kernel program's pressure mode on, or "
                              "the AF_PACKET workers shedding new connections), else 0.", labels=["mode"])
    mode = overload.get("mode") or (overload.get("last_episode") or {}).get("mode") or ""
    gauge.add_metric([str(mode)], 1.0 if overload.get("engaged") else 0.0)
    episodes = CounterMetricFamily("encapfwd_overload_episodes_total",
                                   "Overload episodes since the dispatcher started.")
    episodes.add_metric([], _num(overload.get("episodes")))
    dropped = CounterMetricFamily("encapfwd_overload_dropped_total",
                                  "New connections the AF_PACKET workers dropped under overload, per port.",
                                  labels=["cluster", "port"])
    for name, count in sorted((engine.get("overload_dropped") or {}).items()):
        cluster, _, port = str(name).rpartition("@")
        dropped.add_metric([cluster, port], _num(count))
    orphans = CounterMetricFamily("encapfwd_overload_orphans_dropped_total",
                                  "TCP segments with ACK, without SYN, of no connection (a flood of random ACKs) "
                                  "the AF_PACKET workers dropped under overload, per port.",
                                  labels=["cluster", "port"])
    for name, count in sorted((engine.get("overload_orphans_dropped") or {}).items()):
        cluster, _, port = str(name).rpartition("@")
        orphans.add_metric([cluster, port], _num(count))
    return [gauge, episodes, dropped, orphans]


class ReportCollector:
    """A ``prometheus_client`` custom collector: one fresh report per scrape from *fetch* (a callable
    returning the controller's report; in ``encapfwd run`` a control-socket query)."""

    def __init__(self, fetch: Callable[[], dict], configured_up: Callable[[], Dict[str, bool]] = dict):
        self.fetch = fetch
        self.configured_up = configured_up
        self.histograms = LatencyHistograms()
        # scrapes one at a time: the latency histograms compare each report with the previous one
        self._lock = threading.Lock()

    def describe(self):
        return []  # registration must not scrape

    def collect(self):
        with self._lock:
            report = self.fetch()
            try:
                configured = self.configured_up()
            except Exception:  # noqa: BLE001 - advice only
                configured = {}
            return metric_families(report, configured, self.histograms)


# ----------------------------------------------------------------------------------- the server


#: running servers: their sockets are closed in a forked worker (which must not hold the port)
_RUNNING: "set" = set()


def _forget_in_child() -> None:
    for server in list(_RUNNING):
        server.forget()
    _RUNNING.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_in_child)


def _make_server(host: str, port: int, handler):
    """A :class:`~.httpd.BoundedHTTPServer` bound to (host, port); :class:`MetricsError` with one line
    otherwise."""
    from encapfwd.runtime.httpd import BoundedHTTPServer

    try:
        infos = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM, 0, socket.AI_PASSIVE)
    except (OSError, UnicodeError) as exc:
        raise MetricsError(f"--metrics {host}:{port}: cannot resolve {host}: {one_line(exc)}") from None
    family, _, _, _, sockaddr = infos[0]
    try:
        return BoundedHTTPServer(sockaddr[:2] if family == socket.AF_INET else sockaddr, family, handler,
                                 request_timeout=HTTP_TIMEOUT)
    except OSError as exc:
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        raise MetricsError(f"--metrics {where}: cannot listen: {exc.strerror or exc}") from None


class MetricsServer:
    """The HTTP endpoint (``GET /metrics``; any path but the status page's ``/`` and ``/status.json`` answers
    the same) in a daemon thread."""

    def __init__(self, host: str, port: int, collector: ReportCollector):
        from prometheus_client import CollectorRegistry
        from prometheus_client.exposition import choose_encoder

        self.host, self.port = host, port
        self.collector = collector
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(collector)
        self.failures = 0
        self._failing = False
        from encapfwd.runtime.status_page import (
            StatusPage,  # the status page: "/" and "/status.json" (engines/status_page.py)
        )

        self.status = StatusPage(collector.fetch)

        def handler(method: str, path: str, headers: Dict[str, str]):
            routed = self.status.route(path)
            if routed is not None:
                return routed
            encoder, content_type = choose_encoder(headers.get("accept", ""))
            try:
                body = encoder(self.registry)
            except Exception as exc:  # noqa: BLE001 - a failed scrape never stops the dispatcher
                self.failures += 1
                line = one_line(f"scrape failed: {type(exc).__name__}: {exc}")
                if not self._failing:  # one line when scrapes start failing, one when they work again
                    self._failing = True
                    log(f"metrics: {line}")
                return 503, [("Retry-After", "1")], line.encode() + b"\n"
            if self._failing:
                self._failing = False
                log("metrics: scrapes work again")
            return 200, [("Content-Type", content_type)], body

        self.httpd = _make_server(host, port, handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.2},
                                       name="encapfwd-metrics", daemon=True)
        _RUNNING.add(self)
        self.thread.start()

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def stop(self) -> None:
        _RUNNING.discard(self)
        self.status.stop()
        if self.thread.is_alive():
            self.httpd.shutdown()
            self.thread.join(2)
        self.httpd.server_close()

    def forget(self) -> None:
        """In a forked worker: close the listening socket and open connections, nothing else (the threads
        do not exist there)."""
        self.httpd.forget()


def start_metrics(address: Optional[str], controller) -> Optional[MetricsServer]:
    """Serve *controller*'s metrics on *address* (``--metrics``; None: nothing, returns None). Scrapes
    ask the controller's control socket for its report (see the module's docstring)."""
    if not address:
        return None
    check_available()
    host, port = parse_address(address)
    from encapfwd.control import query_control

    control_path = controller.control_path

    def fetch() -> dict:
        return query_control(control_path, "report", timeout=SCRAPE_TIMEOUT)

    # health from the report alone (each server's state is the installed plan's): one source of truth
    server = MetricsServer(host, port, ReportCollector(fetch))
    log(f"metrics on {server.url}")
    return server


__all__ = [
    "DEFAULT_HOST",
    "LATENCY_BUCKETS",
    "LatencyHistograms",
    "MetricsError",
    "MetricsServer",
    "ReportCollector",
    "check_available",
    "metric_families",
    "overload_families",
    "parse_address",
    "start_metrics",
]
