"""``encapfwd top``: a live view of a running ``encapfwd run`` over its control socket (like ``ipvsadm -L -n
--rate`` refreshed every second).

Per server: health (the installed plan's), weight, packets and bits per second, active flows, the health
detail; per port: servers up, packets and bits per second, flows; the drop reasons with their rates (the
dispatcher counts drops per reason, not per port); the engine, XDP mode, plan and the last reload (a line
``last reload FAILED …: ERROR`` while the last reload failed and the previous plan runs).

On a terminal it is a curses screen: keys ``n`` name, ``p`` pps, ``b`` bps, ``f`` flows, ``h`` health (down
first), ``w`` weight sort the servers, ``r`` reverses, ``q`` quits. Otherwise (a pipe, a file, or ``--once``
/ ``--count N``) it prints the same text every interval, separated by a blank line. Rates are the difference
of two reports over the time between them (the first frame waits one interval for it).
"""

from __future__ import annotations

import sys
import time
from typing import Dict, List, Optional, Tuple

import click

SORTS = {"n": "name", "p": "pps", "b": "bps", "f": "flows", "h": "health", "w": "weight"}


def _num(value) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0.0


def human(value: float, unit: str = "") -> str:
    """``950``, ``1.2k``, ``3.4M`` … (SI, like ipvsadm's rates)."""
    for factor, prefix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.1f}{prefix}{unit}"
    return f"{value:.0f}{unit}"


def server_rows(prev: Optional[dict], cur: dict, dt: float) -> List[dict]:
    """One row per server: name, cluster, port, server, method, state, weight, pps, bps, flows, detail."""
    servers = cur.get("servers") or {}
    before = (prev or {}).get("servers") or {}
    connections = ((cur.get("flows") or {}).get("connections")) or {}
    health = cur.get("health") if isinstance(cur.get("health"), dict) else {}
    rows = []
    for name, row in servers.items():
        if not isinstance(row, dict):
            continue
        parts = str(name).split("@")
        cluster, port, server = parts if len(parts) == 3 else (str(name), "", "")
        old = before.get(name) or {}
        pps = bps = None
        if prev is not None and dt > 0:
            pps = max(0.0, (_num(row.get("packets")) - _num(old.get("packets"))) / dt)
            bps = max(0.0, (_num(row.get("bytes")) - _num(old.get("bytes"))) * 8 / dt)
        h = health.get(name) or {}
        last = h.get("last") or {}
        detail = row.get("reason") or ""
        if last:
            probe = f"{h.get('advisor', '')} {'ok' if last.get('ok') else 'failed'}: {last.get('detail', '')}"
            detail = f"{detail}; {probe}" if detail else probe
        rows.append({
            "name": name, "cluster": cluster, "port": port, "server": server,
            "method": str(row.get("method", "")), "state": row.get("state") or h.get("state") or "?",
            "weight": row.get("weight"), "pps": pps, "bps": bps,
            "flows": int(_num(connections.get(name))), "packets": int(_num(row.get("packets"))),
            "detail": detail.strip(),
        })
    return rows


def sort_rows(rows: List[dict], key: str = "name", reverse: bool = False) -> List[dict]:
    if key == "health":
        k = lambda r: (r["state"] == "up", r["name"])  # down first
    elif key == "name":
        k = lambda r: r["name"]
    else:
        k = lambda r: (r[key] if r[key] is not None else -1, r["name"])
    numeric = key in ("pps", "bps", "flows", "weight")
    return sorted(rows, key=k, reverse=(not reverse) if numeric else reverse)  # numbers: largest first


def port_rows(rows: List[dict]) -> List[dict]:
    ports: Dict[Tuple[str, str], dict] = {}
    for r in rows:
        p = ports.setdefault((r["cluster"], r["port"]), {"name": f"{r['cluster']}:{r['port']}", "up": 0,
                                                          "servers": 0, "pps": None, "bps": None, "flows": 0})
        p["servers"] += 1
        p["up"] += r["state"] == "up"
        p["flows"] += r["flows"]
        if r["pps"] is not None:
            p["pps"] = (p["pps"] or 0) + r["pps"]
            p["bps"] = (p["bps"] or 0) + r["bps"]
    return [ports[k] for k in sorted(ports)]


def drop_rows(prev: Optional[dict], cur: dict, dt: float) -> List[Tuple[str, int, Optional[float]]]:
    drops = cur.get("drops") or {}
    before = (prev or {}).get("drops") or {}
    out = []
    for reason in sorted(drops):
        total = int(_num(drops[reason]))
        rate = max(0.0, (total - _num(before.get(reason))) / dt) if prev is not None and dt > 0 else None
        out.append((reason, total, rate))
    return out


def _rate(value: Optional[float], unit: str = "") -> str:
    return "-" if value is None else human(value, unit)


def render(prev: Optional[dict], cur: dict, dt: float, sort: str = "name", reverse: bool = False,
           width: int = 120) -> List[str]:
    """The screen as lines (the same for curses and plain text)."""
    engine = cur.get("engine") or {}
    mode = f" ({engine['xdp_mode']})" if engine.get("xdp_mode") else ""
    lines = [
        (f"encapfwd top — {engine.get('engine', '?')}{mode} on {engine.get('interface', '?')}, pid "
         f"{engine.get('pid', '?')}, up {_num(engine.get('uptime')):.0f} s, plan {str(engine.get('plan_digest', ''))[:12]}, "
         f"reloads {engine.get('reloads', 0)} (failed {engine.get('reload_errors', 0)})"),
    ]
    if engine.get("last_reload_error"):  # until a reload applies again: the running plan is the previous one
        last = engine.get("last_reload") or {}
        at = (time.strftime(" at %H:%M:%S", time.localtime(last["at"]))
              if last.get("ok") is False and isinstance(last.get("at"), (int, float)) else "")
        lines.append(f"last reload FAILED{at}, the previous plan runs: {engine['last_reload_error']}")
    bgp = cur.get("bgp")
    if isinstance(bgp, dict):
        lines.append(f"bgp: session {bgp.get('session')} with {bgp.get('peer')}, announced "
                     f"{', '.join(bgp.get('announced') or []) or 'nothing'}")
    if engine.get("engine") == "xdp":
        lines.append(f"xdp: forwarded {engine.get('xdp_forwarded', 0)}, passed {engine.get('xdp_passed', 0)}, "
                     f"dropped {engine.get('xdp_dropped', 0)}, tx lost {engine.get('xdp_tx_lost', 0)}")
    rows = sort_rows(server_rows(prev, cur, dt), SORTS.get(sort, sort), reverse)
    lines.append("")
    lines.append(f"{'CLUSTER:PORT':<22} {'SERVER':<24} {'METHOD':<6} {'HEALTH':<6} {'WEIGHT':>6} {'PPS':>8} "
                 f"{'BPS':>8} {'FLOWS':>7} {'PACKETS':>10}  DETAIL")
    for r in rows:
        weight = "-" if r["weight"] is None else str(r["weight"])
        lines.append(f"{r['cluster'] + ':' + r['port']:<22} {r['server']:<24} {r['method']:<6} {r['state']:<6} "
                     f"{weight:>6} {_rate(r['pps']):>8} {_rate(r['bps']):>8} {r['flows']:>7} {r['packets']:>10}  "
                     f"{r['detail']}")
    lines.append("")
    lines.append(f"{'PORT':<22} {'UP':>7} {'PPS':>8} {'BPS':>8} {'FLOWS':>7}")
    for p in port_rows(rows):
        lines.append(f"{p['name']:<22} {str(p['up']) + '/' + str(p['servers']):>7} {_rate(p['pps']):>8} "
                     f"{_rate(p['bps']):>8} {p['flows']:>7}" + ("   NO SERVER UP" if not p["up"] else ""))
    lines.append("")
    drops = drop_rows(prev, cur, dt)
    lines.append(f"{'DROP REASON (all ports)':<24} {'TOTAL':>10} {'PER S':>8}")
    for reason, total, rate in drops:
        lines.append(f"{reason:<24} {total:>10} {_rate(rate):>8}")
    if not drops:
        lines.append("(no drops)")
    return [line[:width] for line in lines]


def _fetch(control: Optional[str], timeout: float) -> dict:
    from encapfwd.control import query_control

    return query_control(control, "report", timeout=timeout)


def plain(control: Optional[str], interval: float, count: Optional[int], sort: str, reverse: bool,
          out=None) -> int:
    out = out or sys.stdout
    prev, t_prev = _fetch(control, 5.0), time.monotonic()
    shown = 0
    while count is None or shown < count:
        time.sleep(interval)
        cur, now = _fetch(control, 5.0), time.monotonic()
        if shown:
            out.write("\n")
        out.write("\n".join(render(prev, cur, now - t_prev, sort, reverse, width=400)) + "\n")
        out.flush()
        prev, t_prev = cur, now
        shown += 1
    return 0


def screen(control: Optional[str], interval: float, sort: str, reverse: bool) -> int:
    import curses

    def main(stdscr) -> int:
        curses.curs_set(0)
        stdscr.timeout(100)
        state = {"sort": sort, "reverse": reverse}
        prev, t_prev = _fetch(control, 5.0), time.monotonic()
        cur, t_cur, dt, error = None, t_prev, 0.0, None
        next_at = time.monotonic()  # the first frame at once (rates after one interval)
        while True:
            now = time.monotonic()
            if now >= next_at:
                try:
                    fresh, t_now = _fetch(control, 5.0), time.monotonic()
                    if cur is not None:
                        prev, t_prev = cur, t_cur
                    cur, t_cur, error = fresh, t_now, None
                    dt = t_cur - t_prev
                except (OSError, ValueError) as exc:
                    error = f"no answer from the dispatcher: {exc}"
                next_at = now + interval
                draw = True
            else:
                draw = False
            key = stdscr.getch()
            if key in (ord("q"), ord("Q")):
                return 0
            if key >= 0 and chr(key) in SORTS:
                state["sort"], draw = SORTS[chr(key)], True
            elif key == ord("r"):
                state["reverse"], draw = not state["reverse"], True
            if not draw or cur is None:
                continue
            height, width = stdscr.getmaxyx()
            lines = render(prev if dt >= interval / 2 else None, cur, dt, state["sort"], state["reverse"], width - 1)
            lines.append("")
            lines.append(f"sort: {state['sort']}{' (reversed)' if state['reverse'] else ''}   keys: n p b f h w "
                         f"sort, r reverse, q quit" + (f"   {error}" if error else ""))
            stdscr.erase()
            for y, line in enumerate(lines[: height - 1]):
                try:
                    stdscr.addstr(y, 0, line[: width - 1])
                except curses.error:
                    pass
            stdscr.refresh()

    return curses.wrapper(main)


@click.command("top")
@click.option("--control", metavar="PATH", default=None,
              help="Control socket of the running 'encapfwd run' (default as 'server report').")
@click.option("--interval", "-d", type=click.FloatRange(0.1, 3600), default=1.0, show_default=True,
              help="Seconds between refreshes (and the rates' period).")
@click.option("--count", "-n", type=click.IntRange(1), default=None,
              help="Print this many frames as plain text, then exit.")
@click.option("--once", is_flag=True, help="Print one frame as plain text (rates over --interval), then exit.")
@click.option("--sort", type=click.Choice(sorted(SORTS.values())), default="name", show_default=True,
              help="Sort the servers by this column (keys n p b f h w on the screen).")
@click.option("--reverse", is_flag=True, help="Reverse the order.")
def top_command(control, interval, count, once, sort, reverse):
    """A live view of the running dispatcher: per server health, weight, pps, bps, active flows; per port
    the servers up; drops by reason. Keys: n p b f h w sort, r reverse, q quit. Plain text when stdout is
    not a terminal, or with --once / --count N."""
    from encapfwd.errors import EncapfwdError

    try:
        _fetch(control, 5.0)
    except (OSError, ValueError) as exc:
        raise EncapfwdError(f"no running encapfwd run answers on its control socket: {exc}") from None
    if once:
        count = 1
    try:
        if count is not None or not sys.stdout.isatty():
            return plain(control, interval, count, sort, reverse)
        return screen(control, interval, sort, reverse)
    except KeyboardInterrupt:
        return 0
