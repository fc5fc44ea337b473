#!/usr/bin/env python3
"""Reports bench/upgrade.sh runs: draws one plot (SVG) of every run against the time since its
takeover started, and prints the markdown for bench/RESULTS.md. Standard library only.

Usage: upgrade_report.py PLOT.svg RUN_DIR...   (each RUN_DIR holds meta.json, samples.tsv, load.json, status)

Per run, from the samples (one row a second): the clients' resumes per second (the generator's
reconnects that joined), the new process's `barrage_handshakes_total{result="ok"}` per second
(rows whose /metrics the new process answered, on both ends of the second), both processes' RSS,
and the publishes accepted and refused (503) per second. The headline figures come from the
generator's JSON report (drain time, peak RSS from VmHWM, messages accepted, lost, duplicates...).
"""
import json
import os
import platform
import statistics
import sys

MIB = 2**20
COLOURS = ["#2471a3", "#c0392b", "#27ae60", "#8e44ad", "#e67e22", "#16a085"]


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    plot_path, dirs = sys.argv[1], sys.argv[2:]
    runs = [load_run(d) for d in dirs]
    runs = [r for r in runs if r["rows"]]
    if not runs:
        sys.exit("upgrade_report.py: no run with samples")
    plot(plot_path, runs)
    print(markdown(plot_path, runs))


def load_run(d):
    meta = json.load(open(os.path.join(d, "meta.json")))
    path = os.path.join(d, "load.json")
    load = json.load(open(path)) if os.path.exists(path) else {}
    status = open(os.path.join(d, "status")).read().strip() if os.path.exists(os.path.join(d, "status")) else "?"
    rows = read_tsv(os.path.join(d, "samples.tsv")) if os.path.exists(os.path.join(d, "samples.tsv")) else []
    take = next((r["t_s"] - r["since_takeover_s"] for r in rows if r.get("since_takeover_s") is not None), None)
    for r in rows:
        r["x"] = None if take is None else r["t_s"] - take
    series = per_second(rows)
    label = load.get("label") or f"drain {meta['rate']}/s"
    return {"dir": d, "meta": meta, "load": load, "status": status, "rows": rows, "take": take, "series": series,
            "label": label}


def read_tsv(path):
    lines = open(path).read().splitlines()
    if not lines:
        return []
    names = lines[0].split("\t")
    rows = []
    for line in lines[1:]:
        row = {}
        for k, v in zip(names, line.split("\t")):
            if k in ("phase", "api_by"):
                row[k] = v
            else:
                row[k] = None if v == "NA" else float(v)
        rows.append(row)
    return rows


def per_second(rows):
    """Rates between consecutive rows, placed at the later row's x."""
    out = {"resumes": [], "new_hs": [], "accepted": [], "refused_503": []}
    for a, b in zip(rows, rows[1:]):
        if b["x"] is None:
            continue
        dt = b["t_s"] - a["t_s"]
        if dt <= 0:
            continue
        for key, col in (("resumes", "reconnects_joined"), ("accepted", "accepted"), ("refused_503", "retried_503")):
            if a.get(col) is not None and b.get(col) is not None:
                out[key].append((b["x"], (b[col] - a[col]) / dt))
        if a.get("api_by") == "new" and b.get("api_by") == "new" and a.get("gw_hs_ok") is not None:
            out["new_hs"].append((b["x"], (b["gw_hs_ok"] - a["gw_hs_ok"]) / dt))
    return out


def fmt(v, spec=",.0f"):
    return "-" if v is None else format(v, spec)


def mib(v):
    return "-" if v is None else f"{v / MIB:,.1f} MiB"


def secs(v):
    return "-" if v is None else f"{v:,.2f} s"


def cores(run, col, lo, hi):
    """CPU seconds per second of `col` between x = lo and x = hi (None if unreadable)."""
    pts = [(r["x"], r[col]) for r in run["rows"] if r["x"] is not None and r.get(col) is not None and lo <= r["x"] <= hi]
    if len(pts) < 2 or pts[-1][0] <= pts[0][0]:
        return None
    return (pts[-1][1] - pts[0][1]) / (pts[-1][0] - pts[0][0])


def markdown(plot_path, runs):
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    mem = int(next(l.split()[1] for l in open("/proc/meminfo") if l.startswith("MemTotal"))) / 2**20
    m0 = runs[0]["meta"]
    n, rooms = m0["connections"], m0["rooms"]
    rates = ", ".join(f"{r['meta']['rate']:,}/s" for r in runs)
    lines = [
        "",
        f"## {m0['stamp']} upgrade: {n:,} connections in {rooms:,} rooms, takeover while publishing "
        f"{m0['publish']:g}/s, drains at {rates}",
        "",
        f"- Machine: {os.cpu_count()} cores ({cpu}), {mem:.0f} GiB, Linux {platform.release()}; both gateways and the "
        "load generator on the same box, loopback, tuning/apply.sh applied and restored.",
        f"- Command: `{m0['command']}`. Each run: a fresh old gateway (release build, "
        f"`{m0['gateway_flags']}`, defaults otherwise, with `--upgrade-control-socket`); the generator "
        f"(`barrage-load upgrade`, {m0['threads']} threads at nice 19) ramps {n:,} clients (client i in room r{{i % "
        f"{rooms}}}, {n // rooms:,} a room) at {m0['ramp_rate']:,}/s, reads each room's last seq, publishes "
        f"{m0['publish']:g} messages/s of {m0['message_bytes']} B round the rooms ({m0['publish'] / rooms:g}/s a room) "
        f"for {m0['steady_s']} s, then starts the new gateway (the same flags, `--takeover "
        "--drain-reconnect-rate-per-s RATE`, at nice 0); publishing goes on until "
        f"{m0['after_s']} s after the old process exited; then the rooms' final seqs are read and the clients "
        "given time to reach them.",
        f"- History: `--history-messages-max {m0['history']}`. A client waiting on the old process sees no new "
        "message until it moves (the old rooms are frozen from the hand-over on) and gets the ones it missed in "
        f"its resume backfill, so a room's history must hold its traffic over the whole drain: "
        f"{m0['publish'] / rooms:g}/s × (N ÷ rate + delay {m0['delay_ms']} ms + jitter {m0['jitter_ms']} ms) ≈ "
        f"{m0['history_need']} messages at the slowest rate (the default history is 50).",
        "- Clients follow the README's client algorithm: per-client last seq; a message at or below it is "
        "dropped (duplicates suppressed); one past last + 1 is a gap, short-polled on the public port "
        "(`GET /v1/rooms/R/messages?after=LAST`), and what the history no longer has counts as lost; on "
        "`reconnect` they wait its delayMs and resume with `?room=R&after=LAST`; an unexpected close backs off "
        "(100 ms doubling to 5 s) and resumes the same way. **Lost** = gap messages the short poll could not "
        "recover + seqs a client had not reached when it was checked at the end.",
        "",
        "| | " + " | ".join(r["label"] + (f" (run {r['meta']['repeat']})" if count(runs, r) > 1 else "") for r in runs) + " |",
        "|---|" + "---:|" * len(runs),
    ]
    rows = [
        ("result (generator exit)", lambda r, L: f"{'**PASS**' if L.get('passed') else '**FAIL**'} ({r['status']})"),
        ("ramp: s to joined (gateway online)", lambda r, L: f"{fmt(L.get('ramp_s'), '.1f')} s to {fmt(L.get('joined_after_ramp'))} ({fmt(L.get('gateway_online_after_ramp'))})"),
        ("hand-over: API answered by the new process after (from the takeover command's start)", lambda r, L: secs(L.get("handover_s"))),
        ("**drain time** (takeover start → old process exit)", lambda r, L: f"**{secs(L.get('drain_s'))}**"),
        ("clients resumed (joined the new process); mean per s over the drain; best second", lambda r, L: f"{fmt(L.get('resumes'))}; {fmt(L.get('resumes_per_s_mean'))}/s; {fmt(L.get('resumes_per_s_peak'))}/s"),
        ("new process `barrage_handshakes_total{result=\"ok\"}`: total; best second", lambda r, L: f"{fmt(L.get('new_handshakes_ok'))}; {fmt(L.get('new_handshakes_per_s_peak'))}/s"),
        ("**peak RSS old** (VmHWM); RSS at the takeover", lambda r, L: f"**{mib(L.get('old_rss_peak_bytes'))}**; {mib(L.get('old_rss_at_takeover_bytes'))}"),
        ("**peak RSS new** (VmHWM); RSS at the end", lambda r, L: f"**{mib(L.get('new_rss_peak_bytes'))}**; {mib(L.get('new_rss_end_bytes'))}"),
        ("CPU over the drain (cores): old / new / generator", lambda r, L: " / ".join(fmt(cores(r, c, 0, L.get("drain_s") or 0), ".2f") for c in ("old_cpu_s", "new_cpu_s", "loadgen_cpu_s"))),
        ("messages accepted (202) / sequenced by the rooms (rooms that differ)", lambda r, L: f"{fmt(L.get('accepted'))} / {fmt(L.get('sequenced'))} ({fmt(L.get('rooms_mismatched'))})"),
        ("publishes retried: 503 / lost connection (answers lost)", lambda r, L: f"{fmt(L.get('retried_503'))} / {fmt(L.get('retried_lost'))} ({fmt(L.get('answers_lost'))})"),
        ("publishes that waited > 100 ms; wait p50 / p99 / max", lambda r, L: f"{fmt(L.get('waited'))}; {fmt(L.get('wait_ms_p50'), ',.1f')} / {fmt(L.get('wait_ms_p99'), ',.1f')} / {fmt(L.get('wait_ms_max'), ',.0f')} ms"),
        ("deliveries expected (Σ clients × their room's messages) / shown", lambda r, L: f"{fmt(L.get('expected'))} / {fmt(L.get('shown'))}"),
        ("**duplicates suppressed**", lambda r, L: f"**{fmt(L.get('duplicates'))}**"),
        ("gaps seen (messages) / filled by short poll (messages recovered)", lambda r, L: f"{fmt(L.get('gaps'))} ({fmt(L.get('gap_messages'))}) / {fmt(L.get('gaps_filled'))} ({fmt(L.get('gap_recovered'))})"),
        ("resume backfills (messages), truncated", lambda r, L: f"{fmt(L.get('backfill_blocks'))} ({fmt(L.get('backfill_messages'))}), {fmt(L.get('truncated'))}"),
        ("**messages lost**", lambda r, L: f"**{fmt(L.get('lost'))}**"),
        ("clients caught up to their room's last seq; time after publishing stopped", lambda r, L: f"{fmt(L.get('caught_up'))}; {secs(L.get('catchup_s'))}"),
        ("reconnect frames / unexpected closes / failed (re)connects", lambda r, L: f"{fmt(L.get('reconnect_frames'))} / {fmt(L.get('unexpected_closes'))} / {fmt(L.get('failed_starts'))}"),
        ("generator errors; publish errors", lambda r, L: f"{json.dumps(L.get('errors', {}))}; {json.dumps(L.get('publish_errors', {}))}"),
    ]
    for name, f in rows:
        lines.append(f"| {name} | " + " | ".join(f(r, r["load"]) for r in runs) + " |")
    lines += medians(runs)
    lines += [
        "",
        f"- Plot: [{os.path.basename(plot_path)}](plots/{os.path.basename(plot_path)}) (x: seconds since the "
        "takeover started; top: clients resumed per second and the new process's handshakes per second; middle: "
        "RSS of both processes; bottom: publishes accepted and answered 503 per second; a vertical line where "
        "each run's old process exited). Samples: "
        + ", ".join(f"`{os.path.join(r['dir'], 'samples.tsv')}`" for r in runs)
        + " (one row a second, every column named in its header).",
    ]
    return "\n".join(lines)


def count(runs, run):
    return sum(1 for r in runs if r["meta"]["rate"] == run["meta"]["rate"])


def medians(runs):
    """Medians per drain rate, when a rate ran more than once."""
    by_rate = {}
    for r in runs:
        by_rate.setdefault(r["meta"]["rate"], []).append(r["load"])
    if all(len(v) < 2 for v in by_rate.values()):
        return []
    keys = [("drain_s", "drain time (s)", ".2f"), ("resumes_per_s_mean", "resumes per s (mean over the drain)", ",.0f"),
            ("old_rss_peak_bytes", "peak RSS old (MiB)", "mib"), ("new_rss_peak_bytes", "peak RSS new (MiB)", "mib"),
            ("wait_ms_max", "longest publish wait (ms)", ",.0f"), ("lost", "messages lost", ",.0f"),
            ("duplicates", "duplicates suppressed", ",.0f")]
    out = ["", "Medians per drain rate:", "", "| | " + " | ".join(f"{k:,}/s ({len(v)} runs)" for k, v in by_rate.items()) + " |",
           "|---|" + "---:|" * len(by_rate)]
    for key, name, spec in keys:
        cells = []
        for loads in by_rate.values():
            vals = [l[key] for l in loads if l.get(key) is not None]
            med = statistics.median(vals) if vals else None
            cells.append(mib(med) if spec == "mib" else fmt(med, spec))
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    return out


# --- plot ----------------------------------------------------------------------------------------

W, PANEL_H = 960, 200
LEFT, RIGHT, TOP, GAP, BOTTOM = 90, 40, 80, 36, 56


def plot(path, runs):
    xmin = -10.0
    xmax = 20.0
    for r in runs:
        xs = [row["x"] for row in r["rows"] if row["x"] is not None]
        if xs:
            end = (r["load"].get("drain_s") or max(xs)) + r["meta"]["after_s"] + 10
            xmax = max(xmax, min(max(xs), end))
    panels = [
        ("reconnects / s", [("resumes", "clients resumed", ""), ("new_hs", "new process handshakes ok", "5,3")], None),
        ("RSS (MiB)", None, [("new_rss_bytes", "new process", ""), ("old_rss_bytes", "old process", "5,3")]),
        ("publishes / s", [("accepted", "accepted (202)", ""), ("refused_503", "answered 503 (retried)", "2,3")], None),
    ]
    height = TOP + len(panels) * PANEL_H + (len(panels) - 1) * GAP + BOTTOM
    px = lambda x: LEFT + (W - LEFT - RIGHT) * (x - xmin) / (xmax - xmin)
    m0 = runs[0]["meta"]
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{height}" font-family="sans-serif" font-size="12">',
           f'<rect width="{W}" height="{height}" fill="white"/>']
    title = (f"barrage zero-downtime upgrade: {m0['connections']:,} connections in {m0['rooms']} rooms, "
             f"{m0['publish']:g} publishes/s throughout")
    out.append(f'<text x="{W/2}" y="24" text-anchor="middle" font-size="16">{title}</text>')
    legend = "   ".join(f'<tspan fill="{COLOURS[i % len(COLOURS)]}">■ {r["label"]}'
                       f'{" (run " + str(r["meta"]["repeat"]) + ")" if count(runs, r) > 1 else ""}: drain '
                       f'{secs(r["load"].get("drain_s"))}, lost {fmt(r["load"].get("lost"))}</tspan>'
                       for i, r in enumerate(runs))
    out.append(f'<text x="{W/2}" y="44" text-anchor="middle">{legend}</text>')
    out.append(f'<text x="{W/2}" y="62" text-anchor="middle" fill="#555">x = 0: the new process starts with --takeover; '
               'vertical lines: the old process exits</text>')
    for i, (name, rates, cols) in enumerate(panels):
        top = TOP + i * (PANEL_H + GAP)
        bottom = top + PANEL_H
        lines = []
        for j, run in enumerate(runs):
            colour = COLOURS[j % len(COLOURS)]
            if rates:
                for key, label, dash in rates:
                    pts = [(x, y) for x, y in run["series"][key] if xmin <= x <= xmax]
                    lines.append((pts, colour, dash, label))
            else:
                for col, label, dash in cols:
                    pts = [(row["x"], row[col] / MIB) for row in run["rows"]
                           if row["x"] is not None and row.get(col) is not None and xmin <= row["x"] <= xmax]
                    lines.append((pts, colour, dash, label))
        ymax = nice(max([y for pts, *_ in lines for _, y in pts] or [1]) or 1)
        py = lambda y, top=top, ymax=ymax: top + PANEL_H - PANEL_H * max(y, 0) / ymax
        for k in range(5):
            y = ymax * k / 4
            out.append(f'<line x1="{LEFT}" x2="{W-RIGHT}" y1="{py(y):.1f}" y2="{py(y):.1f}" stroke="#ddd"/>')
            out.append(f'<text x="{LEFT-6}" y="{py(y)+4:.1f}" text-anchor="end">{tick(y)}</text>')
        out.append(f'<text x="14" y="{(top+bottom)/2}" transform="rotate(-90 14 {(top+bottom)/2})" text-anchor="middle">{name}</text>')
        for j, run in enumerate(runs):
            d = run["load"].get("drain_s")
            if d is not None and xmin <= d <= xmax:
                out.append(f'<line x1="{px(d):.1f}" x2="{px(d):.1f}" y1="{top}" y2="{bottom}" '
                           f'stroke="{COLOURS[j % len(COLOURS)]}" stroke-width="1" opacity="0.6"/>')
        out.append(f'<line x1="{px(0):.1f}" x2="{px(0):.1f}" y1="{top}" y2="{bottom}" stroke="#333" stroke-width="1"/>')
        for pts, colour, dash, _ in lines:
            if not pts:
                continue
            d = f' stroke-dasharray="{dash}"' if dash else ""
            path_pts = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in pts)
            out.append(f'<polyline fill="none" stroke="{colour}" stroke-width="1.5"{d} points="{path_pts}"/>')
        styles = rates or cols
        for s, item in enumerate(styles):
            label, dash = item[1], item[2]
            y = top + 14 + 14 * s
            d = f' stroke-dasharray="{dash}"' if dash else ""
            out.append(f'<line x1="{W-RIGHT-230}" x2="{W-RIGHT-200}" y1="{y-4}" y2="{y-4}" stroke="#333" stroke-width="1.5"{d}/>')
            out.append(f'<text x="{W-RIGHT-194}" y="{y}">{label}</text>')
        out.append(f'<rect x="{LEFT}" y="{top}" width="{W-LEFT-RIGHT}" height="{PANEL_H}" fill="none" stroke="#999"/>')
    base = TOP + len(panels) * PANEL_H + (len(panels) - 1) * GAP
    step = nice((xmax - xmin) / 10)
    x = step * int(xmin / step)
    while x <= xmax:
        if x >= xmin:
            out.append(f'<text x="{px(x):.1f}" y="{base+16}" text-anchor="middle">{tick(x)}</text>')
        x += step
    out.append(f'<text x="{(LEFT+W-RIGHT)/2}" y="{base+38}" text-anchor="middle">seconds since the takeover started</text>')
    out.append("</svg>")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
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
