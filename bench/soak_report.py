#!/usr/bin/env python3
"""Reports a bench/soak.sh run: draws the plot (SVG) and prints the markdown for bench/RESULTS.md.
Standard library only.

Usage: soak_report.py OUT_DIR [EXIT_STATUS]   (OUT_DIR holds meta.json, samples.tsv, load.json)

Flatness, per memory series: the soak phase's rows (after the ramp, while churning and
publishing) from its first row at t0 to its last at t1; the first window is the rows with
t0 + warmup <= t < t0 + warmup + window, the last window the rows with t1 - window < t <= t1.
change = (mean(last) - mean(first)) / mean(first); flat if |change| <= 2 %. Also given: the
least-squares slope over every row after warm-up, per hour, and the range after warm-up.
"""
import json
import os
import platform
import statistics
import sys

FLAT_PCT = 2.0
MIB = 2**20
# (column, label, verdict?) — the verdict covers the gateway's RSS and the kernel's TCP memory as
# sockstat counts it (pages charged to TCP buffers, system-wide); the rest is context: what the
# sockets themselves take (slabs, system-wide), the gateway's own sockets' buffers (ss), the box.
MEMORY = [
    ("gateway_rss_bytes", "gateway RSS", True),
    ("tcp_mem_bytes", "kernel TCP memory (sockstat mem × 4096, system-wide)", True),
    ("gw_sock_mem_bytes", "the gateway's sockets' buffers (ss skmem r+w+f)", False),
    ("tcp_slab_bytes", "kernel TCP socket slabs (TCP, tw_sock_TCP, request_sock_TCP; system-wide)", False),
    ("slab_bytes", "kernel slab, all (Slab:, system-wide)", False),
    ("loadgen_rss_bytes", "load generator RSS", False),
]


def main():
    if len(sys.argv) not in (2, 3):
        sys.exit(__doc__)
    out = sys.argv[1]
    status = sys.argv[2] if len(sys.argv) == 3 else "?"
    meta = json.load(open(os.path.join(out, "meta.json")))
    rows = read_tsv(os.path.join(out, "samples.tsv"))
    load = json.load(open(os.path.join(out, "load.json"))) if os.path.exists(os.path.join(out, "load.json")) else {}
    soak = [r for r in rows if r["phase"] == "soak"]
    if len(soak) < 3:
        sys.exit("soak_report.py: fewer than 3 soak rows")
    t0, t1 = soak[0]["t_s"], soak[-1]["t_s"]
    warm, window = meta["warmup_s"], meta["window_s"]
    first = [r for r in soak if t0 + warm <= r["t_s"] < t0 + warm + window]
    last = [r for r in soak if t1 - window < r["t_s"] <= t1]
    after = [r for r in soak if r["t_s"] >= t0 + warm]
    flat = {col: flatness(col, first, last, after) for col, _, _ in MEMORY}
    plot(meta["plot"], meta, load, rows, soak, (t0 + warm, t0 + warm + window), (t1 - window, t1))
    print(markdown(meta, load, status, rows, soak, first, last, flat))


def read_tsv(path):
    lines = open(path).read().splitlines()
    names = lines[0].split("\t")
    rows = []
    for line in lines[1:]:
        row = {}
        for k, v in zip(names, line.split("\t")):
            if k == "phase":
                row[k] = v
            else:
                row[k] = None if v == "NA" else float(v)
        rows.append(row)
    return rows


def values(rows, col):
    return [r[col] for r in rows if r.get(col) is not None]


def flatness(col, first, last, after):
    a, b = values(first, col), values(last, col)
    if not a or not b:
        return None
    ma, mb = statistics.fmean(a), statistics.fmean(b)
    pts = [(r["t_s"], r[col]) for r in after if r.get(col) is not None]
    slope = None
    if len(pts) >= 2:
        mx, my = statistics.fmean(x for x, _ in pts), statistics.fmean(y for _, y in pts)
        sxx = sum((x - mx) ** 2 for x, _ in pts)
        slope = sum((x - mx) * (y - my) for x, y in pts) / sxx * 3600 if sxx else None
    change = (mb - ma) / ma * 100 if ma else None
    da, db = statistics.median(a), statistics.median(b)
    return {
        "first": ma, "last": mb, "change_pct": change, "flat": change is not None and abs(change) <= FLAT_PCT,
        "median_first": da, "median_last": db, "median_change_pct": (db - da) / da * 100 if da else None,
        "min": min(y for _, y in pts), "max": max(y for _, y in pts), "slope_per_h": slope,
        "n_first": len(a), "n_last": len(b),
    }


def rate(rows, col):
    """Growth of a cumulative column per second over the rows."""
    if len(rows) < 2 or rows[0].get(col) is None or rows[-1].get(col) is None:
        return None
    dt = rows[-1]["t_s"] - rows[0]["t_s"]
    return (rows[-1][col] - rows[0][col]) / dt if dt > 0 else None


def mean(rows, col):
    v = values(rows, col)
    return statistics.fmean(v) if v else None


def delta(rows, col):
    if rows[0].get(col) is None or rows[-1].get(col) is None:
        return None
    return rows[-1][col] - rows[0][col]


def fmt_bytes(v):
    return "-" if v is None else f"{v / MIB:,.1f} MiB"


def fmt(v, spec=",.0f"):
    return "-" if v is None else format(v, spec)


def markdown(meta, load, status, rows, soak, first, last, flat):
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    mem = int(next(l.split()[1] for l in open("/proc/meminfo") if l.startswith("MemTotal"))) / 2**20
    t0, t1 = soak[0]["t_s"], soak[-1]["t_s"]
    joined = values(soak, "joined")
    churn = values(soak[1:], "churn_per_s")
    gw_cpu = rate(soak, "gateway_cpu_s")
    lg_cpu = rate(soak, "loadgen_cpu_s")
    load1 = values(soak, "loadavg1")
    verdicts = [(label, flat[col]) for col, label, v in MEMORY if v and flat[col] is not None]
    all_flat = all(f["flat"] for _, f in verdicts)
    passed = load.get("passed")
    n = meta["connections"]
    lines = [
        "",
        f"## {meta['stamp']} soak: {n:,} connections for {meta['duration_s']:,} s, "
        f"{meta['churn']:,}/s reconnecting, {meta['publish']:,} publishes/s",
        "",
        f"- Machine: {os.cpu_count()} cores ({cpu}), {mem:.0f} GiB, Linux {platform.release()}; gateway and load "
        "generator on the same box (shared with other work: the load average is in the table), loopback, "
        "tuning/apply.sh applied and restored.",
        f"- Command: `{meta['command']}` (exit {status}; load generator "
        f"{'PASS' if passed else 'FAIL' if passed is not None else '?'}). Gateway: release build, "
        f"{load.get('gateway_start', {}) and load['gateway_start'].get('rings', '?')} rings at the start, "
        f"`{meta['gateway_flags']}`, defaults otherwise. Load generator: `barrage-load soak`, "
        f"{meta['threads']} threads at nice 19, sources {meta['sources']}; each of {meta['rooms']:,} rooms gets "
        f"{meta['publish'] / meta['rooms']:g} message/s of {meta['message_bytes']} B (chat, low priority) over one "
        "keep-alive API connection; clients do not ping "
        f"({'ping every ' + str(meta['ping_ms']) + ' ms' if meta['ping_ms'] else 'idle timeout longer than the run'}).",
        f"- Ramp {fmt(load.get('ramp_s'), '.1f')} s to {fmt(load.get('joined_after_ramp'), ',')} joined "
        f"(gateway online {fmt(load.get('gateway_online_after_ramp'), ',')}); soak {t1 - t0:,.0f} s; at the end "
        f"{fmt(load.get('joined_end'), ',')} joined, gateway online {fmt(load.get('gateway_online_end'), ',')}.",
        "",
        "| | value |",
        "|---|---:|",
        f"| connections joined during the soak (min / mean / max of rows) | {min(joined):,.0f} / {statistics.fmean(joined):,.0f} / {max(joined):,.0f} |",
        f"| churn achieved (closes started per s: mean over the soak / lowest row) | {fmt(load.get('churn_per_s_achieved'), ',.1f')} / {fmt(min(churn) if churn else None, ',.0f')} |",
        f"| closes answered by the server / timed out | {fmt(load.get('closes_done'), ',')} / {fmt(load.get('close_timeouts'), ',')} |",
        f"| reconnects / joined / **handshake failures** | {fmt(load.get('reconnects'), ',')} / {fmt(load.get('reconnects_joined'), ',')} / **{fmt(load.get('reconnects_failed'), ',')}** |",
        f"| publishes accepted per s (failed) | {fmt(load.get('publish_per_s_achieved'), ',.1f')} ({fmt(load.get('publish_failed'), ',')}) |",
        f"| frames received by the clients per s (soak mean) | {fmt(rate(soak, 'gw_block_deliveries'), ',.0f')} blocks queued by the gateway; {fmt(statistics.fmean(values(soak[1:], 'frames_per_s')) if len(soak) > 1 else None, ',.0f')} frames read |",
        f"| gateway handshakes ok / failed (soak) | {fmt(delta(soak, 'gw_hs_ok'))} / {fmt(delta(soak, 'gw_hs_failed'))} |",
        f"| gateway closes: peer / idle / slow consumer / close timeout / io error / other (soak) | "
        + " / ".join(fmt(delta(soak, c)) for c in ("gw_closed_peer", "gw_closed_idle", "gw_closed_slow_consumer",
                                                     "gw_closed_close_timeout", "gw_closed_io_error", "gw_closed_other")) + " |",
        f"| gateway refusals (soak) | {fmt(delta(soak, 'gw_refused'))} |",
        f"| gateway rings (start → end) | {fmt(soak[0].get('gw_rings'))} → {fmt(soak[-1].get('gw_rings'))} |",
        f"| messages dropped / frames dropped by the gateway (soak) | {fmt(delta(soak, 'gw_messages_dropped'))} / {fmt(delta(soak, 'gw_frames_dropped'))} |",
        f"| system TCP sockets in use / TIME_WAIT / orphans (soak mean) | {fmt(mean(soak, 'tcp_inuse'))} / {fmt(mean(soak, 'tcp_tw'))} / {fmt(mean(soak, 'tcp_orphan'), ',.1f')} |",
        f"| the gateway's sockets: established / TIME_WAIT / closing / CLOSE_WAIT (soak mean; last row) | "
        f"{fmt(mean(soak, 'gw_sock_estab'))} / {fmt(mean(soak, 'gw_sock_time_wait'))} / {fmt(mean(soak, 'gw_sock_closing'), ',.1f')} / "
        f"{fmt(mean(soak, 'gw_sock_close_wait'), ',.1f')}; {fmt(soak[-1].get('gw_sock_estab'))} / {fmt(soak[-1].get('gw_sock_time_wait'))} / "
        f"{fmt(soak[-1].get('gw_sock_closing'))} / {fmt(soak[-1].get('gw_sock_close_wait'))} |",
        f"| CPU: gateway / load generator (cores, soak mean); load average | {fmt(gw_cpu, '.2f')} / {fmt(lg_cpu, '.2f')}; {fmt(statistics.fmean(load1) if load1 else None, '.1f')} |",
        f"| load generator errors | {json.dumps(load.get('errors', {}))}; publish {json.dumps(load.get('publish_errors', {}))} |",
        "",
        f"Memory, flatness after a {meta['warmup_s']} s warm-up: mean of the rows in the first "
        f"{meta['window_s']} s after warm-up (t = {t0 + meta['warmup_s']:,.0f}–{t0 + meta['warmup_s'] + meta['window_s']:,.0f} s, "
        f"{flat['gateway_rss_bytes']['n_first'] if flat['gateway_rss_bytes'] else 0} rows) against the mean of the rows in the last "
        f"{meta['window_s']} s (t = {t1 - meta['window_s']:,.0f}–{t1:,.0f} s); change = (last − first) ÷ first; flat if within "
        f"±{FLAT_PCT:g} %. Medians of the same windows beside them (robust to spikes); slope: least squares over every row "
        "after warm-up.",
        "",
        "| series | soak start | at warm-up | end | first window (mean) | last window (mean) | change | flat | medians: first → last (change) | range after warm-up | slope per hour |",
        "|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|",
    ]
    warm_row = next((r for r in soak if r["t_s"] >= t0 + meta["warmup_s"]), soak[-1])
    for col, label, verdict in MEMORY:
        f = flat[col]
        if f is None:
            lines.append(f"| {label} | - | - | - | - | - | - | - | - | - | - |")
            continue
        ok = ("**yes**" if f["flat"] else "**no**") if verdict else "(context)"
        lines.append(
            f"| {label} | {fmt_bytes(soak[0].get(col))} | {fmt_bytes(warm_row.get(col))} | {fmt_bytes(soak[-1].get(col))} | "
            f"{fmt_bytes(f['first'])} | {fmt_bytes(f['last'])} | "
            f"{fmt(f['change_pct'], '+.2f')} % | {ok} | {fmt_bytes(f['median_first'])} → {fmt_bytes(f['median_last'])} "
            f"({fmt(f['median_change_pct'], '+.2f')} %) | {fmt_bytes(f['min'])} – {fmt_bytes(f['max'])} | "
            f"{'-' if f['slope_per_h'] is None else format(f['slope_per_h'] / MIB, '+,.2f') + ' MiB'} |")
    lines += [
        "",
        f"- Verdict: {'**flat**' if all_flat else '**not flat**'} — "
        + "; ".join(f"{label} {f['change_pct']:+.2f} %" for label, f in verdicts) + ".",
        f"- Plot: [{os.path.basename(meta['plot'])}](plots/{os.path.basename(meta['plot'])}); samples: "
        f"`bench/out/soak-{meta['stamp']}/samples.tsv` (one row per {meta['sample_s']} s, every column named in its header).",
    ]
    return "\n".join(lines)


# --- plot ----------------------------------------------------------------------------------------

W, PANEL_H = 960, 190
LEFT, RIGHT, TOP, GAP, BOTTOM = 90, 90, 60, 40, 50


def plot(path, meta, load, rows, soak, win1, win2):
    panels = [
        ("gateway RSS (MiB)", [("gateway RSS", "#2471a3", "gateway_rss_bytes", MIB)], None),
        ("kernel TCP (MiB)", [("TCP socket slabs (system-wide)", "#c0392b", "tcp_slab_bytes", MIB),
                              ("sockstat mem × 4096 (system-wide)", "#e67e22", "tcp_mem_bytes", MIB),
                              ("the gateway's sockets' buffers (ss)", "#16a085", "gw_sock_mem_bytes", MIB)], None),
        ("connections", [("joined", "#27ae60", "joined", 1)],
         [("churn closes/s (right)", "#8e44ad", "churn_per_s"), ("publishes/s (right)", "#7f8c8d", "publish_per_s")]),
    ]
    height = TOP + len(panels) * PANEL_H + (len(panels) - 1) * GAP + BOTTOM
    tmax = max(r["t_s"] for r in rows) or 1
    px = lambda t: LEFT + (W - LEFT - RIGHT) * t / tmax
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{height}" font-family="sans-serif" font-size="12">',
           f'<rect width="{W}" height="{height}" fill="white"/>']
    title = (f"barrage soak: {meta['connections']:,} connections, {meta['churn']:,}/s reconnecting, "
             f"{meta['publish']:,} publishes/s, {meta['duration_s']:,} s")
    out.append(f'<text x="{W/2}" y="24" text-anchor="middle" font-size="16">{title}</text>')
    out.append(f'<text x="{W/2}" y="42" text-anchor="middle" fill="#555">shaded: the first window after warm-up and the '
               f'last window, whose means are compared (flat within ±{FLAT_PCT:g} %)</text>')
    for i, (name, series, right) in enumerate(panels):
        top = TOP + i * (PANEL_H + GAP)
        bottom = top + PANEL_H
        ymax = nice(max([max(values(rows, col) or [0]) / div for _, _, col, div in series]) or 1)
        py = lambda y, top=top, ymax=ymax: top + PANEL_H - PANEL_H * y / ymax
        for a, b in (win1, win2):
            out.append(f'<rect x="{px(a):.1f}" y="{top}" width="{max(px(b) - px(a), 1):.1f}" height="{PANEL_H}" fill="#f3f3f3"/>')
        for k in range(5):
            y = ymax * k / 4
            out.append(f'<line x1="{LEFT}" x2="{W-RIGHT}" y1="{py(y):.1f}" y2="{py(y):.1f}" stroke="#ddd"/>')
            out.append(f'<text x="{LEFT-6}" y="{py(y)+4:.1f}" text-anchor="end">{tick(y)}</text>')
        out.append(f'<text x="14" y="{(top+bottom)/2}" transform="rotate(-90 14 {(top+bottom)/2})" text-anchor="middle">{name}</text>')
        legend = []
        for label, colour, col, div in series:
            pts = " ".join(f"{px(r['t_s']):.1f},{py(r[col] / div):.1f}" for r in rows if r.get(col) is not None)
            out.append(f'<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="{pts}"/>')
            legend.append((label, colour))
        if right:
            rmax = nice(max(max(values(rows, col) or [0]) for _, _, col in right) or 1)
            pr = lambda y, top=top, rmax=rmax: top + PANEL_H - PANEL_H * y / rmax
            for label, colour, col in right:
                pts = " ".join(f"{px(r['t_s']):.1f},{pr(r[col]):.1f}" for r in rows if r.get(col) is not None)
                out.append(f'<polyline fill="none" stroke="{colour}" stroke-width="1" points="{pts}"/>')
                legend.append((label, colour))
            for k in range(5):
                y = rmax * k / 4
                out.append(f'<text x="{W-RIGHT+6}" y="{pr(y)+4:.1f}" fill="#555">{tick(y)}</text>')
        width = 8 + 7 * max(len(label) for label, _ in legend)
        out.append(f'<rect x="{LEFT+4}" y="{top+3}" width="{width}" height="{14*len(legend)+4}" fill="white" fill-opacity="0.6"/>')
        for j, (label, colour) in enumerate(legend):
            out.append(f'<text x="{LEFT+10}" y="{top+15+14*j}" fill="{colour}">{label}</text>')
        out.append(f'<rect x="{LEFT}" y="{top}" width="{W-LEFT-RIGHT}" height="{PANEL_H}" fill="none" stroke="#999"/>')
    base = TOP + len(panels) * PANEL_H + (len(panels) - 1) * GAP
    step = next(m for m in (0.25, 0.5, 1, 2, 5, 10, 15, 20, 30, 60, 120) if tmax / 60 / m <= 8) * 60
    t = 0.0
    while t <= tmax:
        out.append(f'<line x1="{px(t):.1f}" x2="{px(t):.1f}" y1="{base}" y2="{base+4}" stroke="#999"/>')
        out.append(f'<text x="{px(t):.1f}" y="{base+16}" text-anchor="middle">{tick(t / 60)}</text>')
        t += step
    out.append(f'<text x="{(LEFT+W-RIGHT)/2}" y="{base+36}" text-anchor="middle">minutes since start (ramp, soak, drain)</text>')
    out.append("</svg>")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    open(path, "w").write("\n".join(out) + "\n")


def tick(y):
    return f"{y:,.2f}".rstrip("0").rstrip(".")


def nice(v):
    """A round number at or above v for an axis."""
    m = 1
    while True:
        for step in (1, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10):
            if v <= step * m:
                return step * m
        m *= 10


if __name__ == "__main__":
    main()
