"""The status page of ``encapfwd run --metrics HOST:PORT``: ``/`` (one self-contained HTML page, no external
asset) and ``/status.json`` (what it shows), beside ``/metrics`` on the same listener. Read-only: nothing
here changes the dispatcher.

Data: the controller's report over its control socket (the same ``fetch`` the metrics use), plus a short
history of every server's counters kept here — sampled every :data:`SAMPLE_EVERY` seconds by a daemon thread
and at every ``/status.json`` request (each request a fresh report; at most one sample per :data:`MIN_GAP`
seconds in the history), for
:data:`HISTORY_SECONDS` seconds — from which the per-server packets and bits per second are computed. The
page asks for ``/status.json`` every :data:`REFRESH` seconds and draws each server's rate as an inline SVG.
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from typing import Callable, Dict, List, Optional

#: seconds between two samples of the background thread
SAMPLE_EVERY = 5.0
#: seconds of history kept (the charts' width)
HISTORY_SECONDS = 600.0
#: seconds at least between two samples
MIN_GAP = 1.0
#: seconds between two refreshes of the page
REFRESH = 2.0


def _num(value) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0.0


class StatusPage:
    """Routes ``/`` and ``/status.json``; :meth:`route` returns None for every other path."""

    def __init__(self, fetch: Callable[[], dict], *, sample_every: float = SAMPLE_EVERY, start: bool = True,
                 clock=time.time):
        self.fetch = fetch
        self.clock = clock
        self.sample_every = sample_every
        self._lock = threading.Lock()
        #: (time, {server: (packets, bytes)}) oldest first
        self.samples: deque = deque()
        self.last_report: Optional[dict] = None
        self.last_error: Optional[str] = None
        self._stop = threading.Event()
        self.thread = None
        if start:
            self.thread = threading.Thread(target=self._run, name="encapfwd-status", daemon=True)
            self.thread.start()

    # -- sampling

    def _run(self) -> None:
        while not self._stop.wait(self.sample_every):
            self.sample(force=False)

    def stop(self) -> None:
        self._stop.set()

    def sample(self, force: bool = True) -> Optional[dict]:
        """A fresh report, added to the history unless the last sample is younger than :data:`MIN_GAP`. With
        *force* (a ``/status.json`` request) always fetched, so the page never shows a state older than its
        request; without (the background thread) not fetched at all when a request sampled lately. None when
        the controller does not answer."""
        now = self.clock()
        with self._lock:
            recent = bool(self.samples) and now - self.samples[-1][0] < (MIN_GAP if force else self.sample_every / 2)
            if recent and not force:
                return self.last_report
        try:
            report = self.fetch()
        except Exception as exc:  # noqa: BLE001 - the page says so; the dispatcher goes on
            with self._lock:
                self.last_error = f"{type(exc).__name__}: {exc}"
            return None
        counters = {name: (_num(row.get("packets")), _num(row.get("bytes")))
                    for name, row in (report.get("servers") or {}).items() if isinstance(row, dict)}
        with self._lock:
            if not recent:
                self.samples.append((now, counters))
            while self.samples and now - self.samples[0][0] > HISTORY_SECONDS:
                self.samples.popleft()
            self.last_report, self.last_error = report, None
        return report

    def history(self) -> Dict[str, List[list]]:
        """``{server: [[time, pps, bps], …]}`` from consecutive samples."""
        with self._lock:
            samples = list(self.samples)
        out: Dict[str, List[list]] = {}
        for (t0, c0), (t1, c1) in zip(samples, samples[1:]):
            dt = t1 - t0
            if dt <= 0:
                continue
            for name, (packets, nbytes) in c1.items():
                p0, b0 = c0.get(name, (packets, nbytes))
                out.setdefault(name, []).append([round(t1, 3), round(max(0.0, packets - p0) / dt, 3),
                                                 round(max(0.0, nbytes - b0) * 8 / dt, 3)])
        return out

    # -- the answers

    def status(self) -> dict:
        report = self.sample(force=True)
        if report is None:
            return {"ok": False, "error": self.last_error, "generated": self.clock()}
        return status_document(report, self.history(), self.clock())

    def route(self, path: str):
        """``(status, headers, body)`` for ``/`` and ``/status.json``; None for any other path."""
        path = path.split("?", 1)[0]
        if path in ("/", "/index.html"):
            return 200, [("Content-Type", "text/html; charset=utf-8"), ("Cache-Control", "no-store")], PAGE
        if path == "/status.json":
            document = self.status()
            body = json.dumps(document, default=str, separators=(",", ":")).encode()
            return (200 if document.get("ok") else 503), [("Content-Type", "application/json"),
                                                           ("Cache-Control", "no-store")], body
        return None


def status_document(report: dict, history: Dict[str, List[list]], now: float) -> dict:
    """What the page shows, from one controller report and the servers' rate history."""
    engine = report.get("engine") or {}
    health = report.get("health") if isinstance(report.get("health"), dict) else {}
    connections = ((report.get("flows") or {}).get("connections")) or {}
    clusters: Dict[str, Dict[str, list]] = {}
    for name, row in sorted((report.get("servers") or {}).items()):
        if not isinstance(row, dict):
            continue
        parts = str(name).split("@")
        cluster, port, server = parts if len(parts) == 3 else (str(name), "", "")
        h = health.get(name) or {}
        probes = []
        for advisor, arow in (h.get("advisors") or {}).items():
            if isinstance(arow, dict):
                probes.append({"advisor": advisor, "state": arow.get("state"), "last": arow.get("last"),
                               "since": arow.get("since"), "changes": arow.get("changes")})
        if not probes and h.get("last"):
            probes.append({"advisor": h.get("advisor"), "state": h.get("state"), "last": h.get("last"),
                           "since": h.get("since"), "changes": h.get("changes")})
        rates = history.get(name) or []
        clusters.setdefault(cluster, {}).setdefault(port, []).append({
            "name": name, "server": server, "method": row.get("method"), "state": row.get("state"),
            "reason": row.get("reason"), "weight": row.get("weight"), "packets": row.get("packets", 0),
            "bytes": row.get("bytes", 0), "flows": connections.get(name, 0) if connections else 0,
            "pps": rates[-1][1] if rates else None, "bps": rates[-1][2] if rates else None,
            "history": rates, "probes": probes,
        })
    bgp = report.get("bgp") if isinstance(report.get("bgp"), dict) else None
    return {
        "ok": True,
        "generated": now,
        "refresh": REFRESH,
        "engine": {k: engine.get(k) for k in (
            "engine", "engine_reason", "xdp_mode", "interface", "mac", "workers", "pid", "uptime", "plan_digest",
            "selection_digest", "reloads", "reload_errors", "last_reload_error", "last_reload", "restart_needed",
            "unresolved", "xdp_forwarded", "xdp_passed", "xdp_dropped", "xdp_tx_lost", "rx", "tx",
            "kernel_drops", "tx_ring_full", "config")},
        "clusters": [{"address": c, "ports": [{"port": p, "servers": servers} for p, servers in sorted(
            ports.items(), key=lambda item: int(item[0]) if str(item[0]).isdigit() else 0)]}
            for c, ports in sorted(clusters.items())],
        "flows": {k: (report.get("flows") or {}).get(k) for k in ("flows", "entries", "maxflows", "created",
                                                                   "expired", "evictions")},
        "drops": report.get("drops") or {},
        "forwarded": report.get("forwarded", 0),
        "dropped": report.get("dropped", 0),
        "bgp": bgp,
    }


PAGE = r"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>encapfwd</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body{font:14px/1.4 system-ui,sans-serif;margin:1.2em;color:#1b1f23;background:#fafbfc}
h1{font-size:1.3em;margin:0 0 .3em} h2{font-size:1.05em;margin:1.2em 0 .4em}
table{border-collapse:collapse;background:#fff;margin-bottom:.6em} td,th{border:1px solid #d0d7de;padding:.25em .55em;
text-align:left;vertical-align:middle} th{background:#f0f3f6;font-weight:600} td.n{text-align:right;font-variant-numeric:tabular-nums}
.up{color:#116329;font-weight:600} .down{color:#cf222e;font-weight:700} .muted{color:#6e7781}
.err{background:#ffebe9;border:1px solid #cf222e;padding:.4em .6em;margin:.4em 0} .kv td:first-child{font-weight:600}
svg{display:block} .alert{color:#cf222e;font-weight:700}
</style></head><body>
<h1>encapfwd <span id="head" class="muted"></span></h1>
<div id="error"></div>
<table class="kv" id="engine"></table>
<div id="clusters"></div>
<h2>Flows and drops</h2><div id="drops"></div>
<h2>BGP</h2><div id="bgp"></div>
<p class="muted">Read-only. Refreshed every <span id="every">2</span> s from <a href="status.json">status.json</a>;
metrics at <a href="metrics">/metrics</a>. Updated <span id="updated">never</span>.</p>
<script>
"use strict";
const $ = id => document.getElementById(id);
const esc = s => String(s === null || s === undefined ? "" : s).replace(/[&<>"']/g,
  c => ({"&":"&amp;","<":"&lt;",">":"&gt;","\"":"&quot;","'":"&#39;"}[c]));
function human(v, unit) {
  if (v === null || v === undefined) return "–";
  for (const [f, p] of [[1e9,"G"],[1e6,"M"],[1e3,"k"]]) if (Math.abs(v) >= f) return (v/f).toFixed(1)+p+(unit||"");
  return Math.round(v)+(unit||"");
}
function when(t) { return t ? new Date(t*1000).toLocaleString() : "–"; }
function chart(points, index, color) {
  const w = 180, h = 34;
  if (!points || points.length < 2) return '<svg width="'+w+'" height="'+h+'"><text x="2" y="20" fill="#6e7781" font-size="11">collecting…</text></svg>';
  const t0 = points[0][0], t1 = points[points.length-1][0], span = Math.max(t1 - t0, 1);
  const max = Math.max(...points.map(p => p[index]), 1e-9);
  const xy = points.map(p => ((p[0]-t0)/span*(w-2)+1).toFixed(1)+","+(h-2-(p[index]/max)*(h-6)).toFixed(1)).join(" ");
  return '<svg width="'+w+'" height="'+h+'" viewBox="0 0 '+w+' '+h+'"><polyline fill="none" stroke="'+color+
    '" stroke-width="1.5" points="'+xy+'"/><text x="'+(w-2)+'" y="10" text-anchor="end" font-size="9" fill="#6e7781">max '+
    human(max)+'</text></svg>';
}
function probeText(probes) {
  return probes.map(p => esc(p.advisor)+": "+esc(p.state)+(p.last ? " — "+(p.last.ok ? "ok" : "failed")+" "+
    esc(p.last.detail)+(p.last.latency !== undefined && p.last.latency !== null ? " ("+(p.last.latency*1000).toFixed(1)+" ms)" : "")+
    ", "+when(p.last.at) : "")).join("<br>");
}
function render(d) {
  const e = d.engine;
  $("head").textContent = "— " + (e.engine||"?") + (e.xdp_mode ? " ("+e.xdp_mode+")" : "") + " on " + (e.interface||"?");
  $("every").textContent = d.refresh;
  const lr = e.last_reload;
  $("engine").innerHTML = [
    ["Engine", esc(e.engine)+(e.xdp_mode ? " — XDP mode "+esc(e.xdp_mode) : "")+' <span class="muted">'+esc(e.engine_reason)+"</span>"],
    ["Interface", esc(e.interface)+" "+esc(e.mac)+", "+esc(e.workers)+" worker(s), pid "+esc(e.pid)+", up "+human(e.uptime)+" s"],
    ["Plan", "<code>"+esc(e.plan_digest)+"</code>"],
    ["Reloads", esc(e.reloads)+" ("+esc(e.reload_errors)+" failed)"+(lr ? "; last "+when(lr.at)+": "+
      (lr.ok ? '<span class="up">applied</span>' : '<span class="down">failed</span> '+esc(lr.error)) : "")],
    ["Last reload error", e.last_reload_error ? '<span class="down">'+esc(e.last_reload_error)+"</span>" : "none"],
    ["Configuration", esc(e.config)+((e.restart_needed||[]).length ? ' <span class="alert">restart needed: '+esc(e.restart_needed.join("; "))+"</span>" : "")],
  ].map(([k,v]) => "<tr><td>"+k+"</td><td>"+v+"</td></tr>").join("");
  let html = "";
  for (const c of d.clusters) for (const p of c.ports) {
    const up = p.servers.filter(s => s.state === "up").length;
    html += "<h2>"+esc(c.address)+":"+esc(p.port)+' <span class="'+(up ? "muted" : "alert")+'">'+up+"/"+p.servers.length+
      " servers up"+(up ? "" : " — new flows are dropped")+"</span></h2><table><tr><th>Server</th><th>Method</th><th>Health</th>"+
      "<th>Weight</th><th>pps</th><th>bps</th><th>Active flows</th><th>Packets</th><th>Last probe / reason</th><th>pps (last minutes)</th><th>bps</th></tr>";
    for (const s of p.servers) {
      html += '<tr data-server="'+esc(s.name)+'" data-state="'+esc(s.state)+'"><td>'+esc(s.server)+"</td><td>"+esc(s.method)+
        '</td><td class="'+(s.state === "up" ? "up" : "down")+'">'+esc(s.state)+'</td><td class="n">'+esc(s.weight)+
        '</td><td class="n">'+human(s.pps)+'</td><td class="n">'+human(s.bps)+'</td><td class="n">'+esc(s.flows)+
        '</td><td class="n">'+esc(s.packets)+"</td><td>"+(s.reason ? '<span class="down">'+esc(s.reason)+"</span><br>" : "")+
        probeText(s.probes)+"</td><td>"+chart(s.history, 1, "#0969da")+"</td><td>"+chart(s.history, 2, "#8250df")+"</td></tr>";
    }
    html += "</table>";
  }
  $("clusters").innerHTML = html || '<p class="muted">no cluster configured</p>';
  const drops = Object.entries(d.drops || {}).sort((a,b) => b[1]-a[1]);
  $("drops").innerHTML = "<table><tr><th>Forwarded</th><td class=n>"+esc(d.forwarded)+"</td><th>Dropped</th><td class=n>"+esc(d.dropped)+
    "</td><th>Flows</th><td class=n>"+esc(d.flows.flows)+" / "+esc(d.flows.maxflows)+"</td></tr>"+
    (e.engine === "xdp" ? "<tr><th>XDP forwarded</th><td class=n>"+esc(e.xdp_forwarded)+"</td><th>XDP dropped</th><td class=n>"+esc(e.xdp_dropped)+
      "</td><th>XDP_TX lost</th><td class=n"+(e.xdp_tx_lost ? ' style="color:#cf222e"' : "")+">"+esc(e.xdp_tx_lost)+"</td></tr>" : "")+
    "</table><table><tr><th>Drop reason</th><th>Packets</th></tr>"+
    (drops.length ? drops.map(([r,n]) => "<tr><td>"+esc(r)+'</td><td class="n">'+esc(n)+"</td></tr>").join("") : '<tr><td colspan=2 class="muted">no drops</td></tr>')+"</table>";
  const b = d.bgp;
  $("bgp").innerHTML = b ? "<table class=kv><tr><td>Session</td><td class='"+(b.session === "up" ? "up" : "down")+"'>"+esc(b.session)+
    " with "+esc(b.peer)+" (AS "+esc(b.asn)+" → "+esc(b.peer_asn)+")</td></tr><tr><td>Announced</td><td>"+(esc((b.announced||[]).join(", ")) || "nothing")+
    "</td></tr><tr><td>Failed attempts / restarts</td><td>"+esc(b.failed_attempts)+" / "+esc(b.restarts)+"</td></tr></table>" : '<p class="muted">not configured</p>';
  $("updated").textContent = when(d.generated);
}
async function refresh() {
  let delay = 2000;
  try {
    const answer = await fetch("status.json", {cache: "no-store"});
    const d = await answer.json();
    if (!d.ok) throw new Error(d.error || ("HTTP " + answer.status));
    $("error").innerHTML = "";
    render(d);
    delay = (d.refresh || 2) * 1000;
  } catch (err) {
    $("error").innerHTML = '<div class="err">No answer from the dispatcher: '+esc(err.message)+"</div>";
  }
  setTimeout(refresh, delay);
}
refresh();
</script></body></html>
""".encode()


__all__ = ["PAGE", "REFRESH", "StatusPage", "status_document"]
