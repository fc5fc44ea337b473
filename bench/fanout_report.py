#!/usr/bin/env python3
"""Turns one bench/fanout.sh run (a directory of `barrage-load fanout` JSON reports) into markdown
for bench/RESULTS.md: per room size and mode, a table of absolute figures per server and of
barrage's ratios to each (barrage ÷ server), the targets from shared/ANCHORS.md checked, and an
SVG plot (deliveries/s and CPU s per million deliveries per server). Standard library only.

Usage:
  fanout_report.py DIR [--plot OUT.svg]      markdown to stdout (DIR/meta.json, DIR/runs/*.json)
  fanout_report.py --sample-cpu PID OUT.tsv  samples the CPU of PID and its descendants 4x a second
                                             until PID exits (fanout.sh runs it beside each server)
  fanout_report.py --sample-redis PORT OUT.tsv  samples a redis-server's INFO (commands processed,
                                             CPU, memory) 4x a second until it stops answering

CPU s / 1M deliveries is the generator's figure (the server pid's CPU over the measured window).
A server of several processes (Nchan: nginx workers are the master's children) has most of its CPU
outside that pid, so for it the figure comes from the sampled process tree instead: the busiest
`duration_s` seconds of tree CPU within the last duration_s + 5 s before the report was written,
shown with "≈".
"""
import json
import math
import os
import platform
import sys
import time

FIELDS_MS = ("p50", "p99", "p999")


def main():
    if len(sys.argv) >= 4 and sys.argv[1] == "--sample-cpu":
        return sample_cpu(int(sys.argv[2]), sys.argv[3])
    if len(sys.argv) >= 4 and sys.argv[1] == "--sample-redis":
        return sample_redis(int(sys.argv[2]), sys.argv[3])
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    out_dir = sys.argv[1]
    plot = sys.argv[sys.argv.index("--plot") + 1] if "--plot" in sys.argv else None
    meta = json.load(open(os.path.join(out_dir, "meta.json")))
    runs = load_runs(out_dir, meta)
    print(markdown(meta, runs, out_dir, plot))
    if plot:
        open(plot, "w").write(svg(meta, runs))


# --- CPU of a process tree ----------------------------------------------------------------------

def reporting_order():
    """The guest's free page reporting order while the runs went (bench/fanout.sh), or 'none'."""
    try:
        return open("/sys/module/page_reporting/parameters/page_reporting_order").read().strip()
    except OSError:
        return "none"


def tree_cpu_s(pid):
    """User + system CPU seconds of pid and every descendant (threads included), and the count."""
    tick = os.sysconf("SC_CLK_TCK")
    total, count, todo = 0, 0, [pid]
    while todo:
        p = todo.pop()
        try:
            stat = open(f"/proc/{p}/stat").read()
            fields = stat[stat.rindex(")") + 2:].split()
            total += int(fields[11]) + int(fields[12])
            count += 1
            for task in os.listdir(f"/proc/{p}/task"):
                todo += [int(c) for c in open(f"/proc/{p}/task/{task}/children").read().split()]
        except (OSError, ValueError):
            continue
    return total / tick, count


def sample_cpu(pid, out):
    with open(out, "w") as f:
        f.write("t_unix\ttree_cpu_s\tprocesses\n")
        while os.path.exists(f"/proc/{pid}"):
            cpu, n = tree_cpu_s(pid)
            f.write(f"{time.time():.3f}\t{cpu:.2f}\t{n}\n")
            f.flush()
            time.sleep(0.25)


def tree_window_cpu(tsv, end_t, duration):
    """Most tree CPU used in any `duration` s inside [end_t - duration - 5, end_t]."""
    try:
        rows = [tuple(map(float, l.split("\t")[:3])) for l in open(tsv).read().splitlines()[1:]]
    except (OSError, ValueError):
        return None, 1
    rows = [r for r in rows if end_t - duration - 5 <= r[0] <= end_t]
    procs = max((r[2] for r in rows), default=1)
    best = None
    for i, (t0, c0, _) in enumerate(rows):
        for t1, c1, _ in rows[i:]:
            if t1 - t0 >= duration - 0.25:
                best = max(best or 0, (c1 - c0) * duration / (t1 - t0))
                break
    return best, procs


# --- Redis beside barrage-redis -----------------------------------------------------------------

REDIS_FIELDS = ("total_commands_processed", "used_cpu_user", "used_cpu_sys", "used_memory")


def redis_info(sock):
    sock.sendall(b"INFO\r\n")
    data = b""
    while not data.startswith(b"$") or data.count(b"\r\n") < 1:
        data += sock.recv(65536)
    size = int(data[1:data.index(b"\r\n")])
    body_at = data.index(b"\r\n") + 2
    while len(data) < body_at + size + 2:
        chunk = sock.recv(65536)
        if not chunk:
            raise OSError("redis closed")
        data += chunk
    info = dict(l.split(":", 1) for l in data[body_at:body_at + size].decode().splitlines() if ":" in l)
    return [float(info.get(k, "nan")) for k in REDIS_FIELDS]


def sample_redis(port, out):
    import socket
    with open(out, "w") as f, socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        f.write("t_unix\t" + "\t".join(REDIS_FIELDS) + "\n")
        while True:
            try:
                values = redis_info(sock)
            except (OSError, ValueError):
                return
            f.write(f"{time.time():.3f}\t" + "\t".join(f"{v:.3f}" for v in values) + "\n")
            f.flush()
            time.sleep(0.25)


def redis_window(tsv, end_t, duration):
    """Commands/s, CPU s/s and the memory of the redis-server over the measured window: the rows
    within [end_t - duration, end_t] (the report's mtime closes the window)."""
    try:
        rows = [list(map(float, l.split("\t"))) for l in open(tsv).read().splitlines()[1:]]
    except (OSError, ValueError):
        return None
    rows = [r for r in rows if end_t - duration - 0.5 <= r[0] <= end_t]
    if len(rows) < 2 or rows[-1][0] - rows[0][0] < 1:
        return None
    a, b = rows[0], rows[-1]
    span = b[0] - a[0]
    return {"commands_per_s": (b[1] - a[1]) / span, "cpu_per_s": (b[2] + b[3] - a[2] - a[3]) / span,
            "cpu_s": (b[2] + b[3] - a[2] - a[3]) * duration / span, "used_memory": b[4]}


def metrics(path):
    """barrage's /metrics at the end of a run: {name{labels}: value}."""
    out = {}
    try:
        for line in open(path):
            if line.startswith("#") or " " not in line:
                continue
            key, value = line.rsplit(" ", 1)
            try:
                out[key] = float(value)
            except ValueError:
                pass
    except OSError:
        pass
    return out


def redis_table(meta, runs):
    rows = [(k, r) for k, r in sorted(runs.items()) if r.get("_redis")]
    if not rows:
        return []
    out = [
        "\n### Redis beside barrage-redis (the measured window)\n",
        "Redis commands are counted by the server (INFO `total_commands_processed`; a pipelined "
        "batch counts each command); Redis CPU is its user + system time; barrage's counters come from "
        "its /metrics at the end of the run (warm-up included). ÷ = barrage-redis ÷ barrage in the same "
        "run and mode.\n",
        "| members | mode | Redis commands/s | Redis CPU (cores) | Redis CPU s/1M deliveries | barrage + Redis CPU s/1M "
        "| Redis memory at end | store writes (blocks, changes) | write buffer overflowed | Redis errors "
        "| ÷ deliveries/s | ÷ barrage CPU s/1M |",
        "|---:|---|" + "---:|" * 10,
    ]
    for (members, mode, server), r in rows:
        x, m = r["_redis"], r.get("_metrics", {})
        per_m = x["cpu_s"] / r["delivered"] * 1e6 if r.get("delivered") else None
        own = r.get("cpu_s_per_million_deliveries")
        base = runs.get((members, mode, server.removesuffix("-redis")), {})
        out.append("| " + " | ".join([
            f"{members:,}", mode, num(x["commands_per_s"]), f"{x['cpu_per_s']:.2f}", num(per_m, "{:.2f}"),
            num(own + per_m if own is not None and per_m is not None else None, "{:.2f}"),
            f"{x['used_memory'] / 2**20:,.0f} MiB",
            num(m.get("barrage_redis_writes_total")), num(m.get("barrage_redis_writes_overflowed_total")),
            num(m.get("barrage_redis_errors_total")),
            ratio(r.get("delivered_per_s"), base.get("delivered_per_s")),
            ratio(own, base.get("cpu_s_per_million_deliveries")),
        ]) + " |")
    return out


# --- Runs ----------------------------------------------------------------------------------------

def load_runs(out_dir, meta):
    runs = {}
    for name in sorted(os.listdir(os.path.join(out_dir, "runs"))):
        if not name.endswith(".json"):
            continue
        path = os.path.join(out_dir, "runs", name)
        try:
            r = json.load(open(path))
        except (OSError, ValueError) as e:
            r = {"failed": f"unreadable report: {e}"}
        members, mode, server = name[:-5].split("-", 2)
        r.setdefault("label", server)
        r["_cpu_note"] = ""
        if "delivered" in r:
            cpu, procs = tree_window_cpu(path[:-5] + ".cpu.tsv", os.path.getmtime(path), r.get("duration_s") or meta["duration_s"])
            if (procs > 1 or r.get("cpu_s_per_million_deliveries") is None) and cpu is not None and r["delivered"]:
                r["cpu_s_per_million_deliveries"] = cpu / r["delivered"] * 1e6
                r["_cpu_note"] = "≈"
            base = path[:-5]
            if os.path.exists(base + ".redis.tsv"):
                r["_redis"] = redis_window(base + ".redis.tsv", os.path.getmtime(path),
                                           r.get("duration_s") or meta["duration_s"])
                r["_metrics"] = metrics(base + ".metrics.txt")
        runs[(int(members), mode, server)] = r
    return runs


def ratio(a, b):
    if a is None or b is None or b == 0:
        return "–"
    return f"{a / b:.2f}×"


def num(v, fmt="{:,.0f}"):
    return "–" if v is None else fmt.format(v)


def ms(ns):
    return "–" if ns is None else f"{ns / 1e6:.1f}"


def markdown(meta, runs, out_dir, plot):
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    mem = int(next(l.split()[1] for l in open("/proc/meminfo") if l.startswith("MemTotal"))) / 2**20
    others = sum(not s["name"].startswith("barrage") for s in meta["servers"])
    rooms = meta.get("rooms", 1)
    sizes = " and ".join(f"{m:,}" for m in meta["sizes"])
    lines = [
        f"\n## {meta['stamp']} fanout: barrage and {others} other server{'s' if others != 1 else ''} "
        "(the floors included), "
        + (f"one room of {sizes} members" if rooms == 1 else f"{rooms} rooms sharing {sizes} members"),
        "",
        f"- Machine: {os.cpu_count()} cores ({cpu}), {mem:.0f} GiB, Linux {platform.release()}; servers and load "
        "generator on the same box, loopback, tuning/apply.sh applied and restored; free page reporting "
        f"order {reporting_order()}.",
        f"- Command: `{meta['command']}`.",
        f"- Pinning: {meta['pinning']}. Threads:",
    ]
    lines += [f"  - {s['name']}: {s['runs_with']}" for s in meta["servers"]]
    lines += [
        "- Columns: deliveries/s = messages received by subscribers per second; frames/s = WebSocket frames "
        "(a barrage block carries several messages); latency from publish to receipt (ms); reach-all = time "
        "until a message reached every member; CPU = server CPU s per million deliveries (\"≈\": from the "
        "sampled process tree); lost = expected − delivered. Ratios are barrage ÷ server: above 1 is "
        "barrage ahead for deliveries/s and frames/s, below 1 is barrage ahead for CPU and latency.",
    ]
    for members in meta["sizes"]:
        for mode in meta["modes"]:
            lines += table(meta, runs, members, mode)
    lines += redis_table(meta, runs)
    lines += targets(meta, runs)
    if plot:
        lines.append(f"\n- Plot: [{os.path.basename(plot)}](plots/{os.path.basename(plot)}); reports: `{out_dir}/runs/`.")
    return "\n".join(lines)


def plan(meta, members, mode):
    return meta.get("plan", {}).get(f"{members}-{mode}", {})


def table(meta, runs, members, mode):
    p = plan(meta, members, mode)
    what = {
        "rate": f"latency, publishing at {p.get('rate', '?'):g} msgs/s",
        "saturate": "throughput, publishers saturating (closed loop, 32 messages in flight per room)",
        "deep": "throughput, publishers saturating with 256 messages in flight per room",
        "frames": f"send-bound, publishing at {p.get('rate', '?'):g} msgs/s (more than the one-frame floor sends)",
    }.get(mode, mode)
    out = [
        f"\n### {members:,} members, {what}; barrage block interval {p.get('block_interval_ms', '?')} ms\n",
        "| server | deliveries/s | frames/s | msgs/frame | p50 | p99 | p999 | reach-all p99 | CPU s/1M | lost "
        "| ÷ deliveries/s | ÷ frames/s | ÷ CPU | ÷ reach-all p99 |",
        "|---|" + "---:|" * 14,
    ]
    b = runs.get((members, mode, "barrage"), {})
    for s in meta["servers"]:
        r = runs.get((members, mode, s["name"]))
        if r is None:
            continue
        if "delivered_per_s" not in r:
            why = f"n/a ({r['na']})" if "na" in r else f"failed: {r.get('failed', '?')}"
            out.append(f"| {s['name']} | {why} |" + " |" * 13)
            continue
        lat, reach = r.get("latency_ns") or {}, r.get("reach_all_ns") or {}
        flag = "" if r.get("passed", True) else " ⚠"
        cells = [
            s["name"] + flag,
            num(r.get("delivered_per_s")),
            num(r.get("frames_per_s")),
            num(r.get("messages_per_frame"), "{:.1f}"),
            *(ms(lat.get(k)) for k in FIELDS_MS),
            ms(reach.get("p99")),
            r["_cpu_note"] + num(r.get("cpu_s_per_million_deliveries"), "{:.2f}"),
            num(r.get("lost")),
        ]
        if s["name"] == "barrage":
            cells += [""] * 4
        else:
            blat = (b.get("reach_all_ns") or {}).get("p99")
            cells += [
                ratio(b.get("delivered_per_s"), r.get("delivered_per_s")),
                ratio(b.get("frames_per_s"), r.get("frames_per_s")),
                ratio(b.get("cpu_s_per_million_deliveries"), r.get("cpu_s_per_million_deliveries")),
                ratio(blat, reach.get("p99")),
            ]
        out.append("| " + " | ".join(cells) + " |")
    rows = [runs[(members, mode, s["name"])] for s in meta["servers"] if (members, mode, s["name"]) in runs]
    notes = [f"{r['label']}: {note(r)}" for r in rows if note(r)]
    if any(r.get("passed") is False for r in rows):
        out.append("\n⚠ = the generator's `passed` was false (see its report).")
    if notes:
        out.append("\nNotes: " + "; ".join(notes) + ".")
    return out


def note(r):
    bits = []
    if r.get("server_dropped_counted"):
        bits.append(f"server dropped {r['server_dropped_counted']:,}")
    if r.get("publish_errors"):
        bits.append(f"{r['publish_errors']:,} publish errors")
    if r.get("errors"):
        bits.append("errors " + json.dumps(r["errors"]))
    if r.get("subscribed") is not None and r.get("members") and r["subscribed"] < r["members"]:
        bits.append(f"{r['subscribed']:,} of {r['members']:,} subscribed")
    return ", ".join(bits)


def targets(meta, runs):
    """The targets of shared/ANCHORS.md, checked on this run's own figures."""
    out = ["\nTargets (shared/ANCHORS.md), checked side by side in this run:"]
    for members in meta["sizes"]:
        sat = lambda s: runs.get((members, "saturate", s), {})
        b, floor, uws = sat("barrage"), sat("floor"), sat("uwsjs")
        checks = []
        fb, ff = runs.get((members, "frames", "barrage"), {}), runs.get((members, "frames", "floor"), {})
        if "frames_per_s" in fb and "frames_per_s" in ff:
            checks.append(check("frames/s ≥ 0.9× the one-frame floor (send-bound runs)",
                                fb["frames_per_s"] >= 0.9 * ff["frames_per_s"], f"{fb['frames_per_s'] / ff['frames_per_s']:.2f}×"))
        if "delivered_per_s" in b and "delivered_per_s" in uws:
            checks.append(check("deliveries/s above uWebSockets.js", b["delivered_per_s"] > uws["delivered_per_s"],
                                f"{b['delivered_per_s'] / uws['delivered_per_s']:.2f}×"))
        bc, uc = b.get("cpu_s_per_million_deliveries"), uws.get("cpu_s_per_million_deliveries")
        if bc is not None and uc:
            checks.append(check("CPU s/1M below uWebSockets.js", bc < uc, f"{bc:.2f} vs {uc:.2f}"))
        rb = (runs.get((members, "rate", "barrage"), {}).get("reach_all_ns") or {}).get("p99")
        rf = (runs.get((members, "rate", "floor"), {}).get("reach_all_ns") or {}).get("p99")
        interval = plan(meta, members, "rate").get("block_interval_ms", 0)
        if rb is not None and rf is not None:
            limit = interval * 1e6 + 1.1 * rf
            checks.append(check(f"reach-all p99 ≤ block interval ({interval} ms) + 1.1× the floor's",
                                rb <= limit, f"{rb / 1e6:.1f} ms vs {limit / 1e6:.1f} ms"))
        if checks:
            out.append(f"- {members:,} members: " + "; ".join(checks) + ".")
    return out if len(out) > 1 else []


def check(what, ok, detail):
    return f"{what}: {'**met**' if ok else '**not met**'} ({detail})"


# --- Plot ----------------------------------------------------------------------------------------

W, ROW, TOP, LEFT, GAP = 1000, 18, 70, 130, 40
COLOURS = ["#2471a3", "#c0392b", "#27ae60", "#8e44ad"]


def svg(meta, runs):
    """Two panels of horizontal bars, log scale: deliveries/s and CPU s per 1M, per server and size
    (throughput runs; latency runs when there are none)."""
    mode = "saturate" if "saturate" in meta["modes"] else meta["modes"][0]
    servers = [s["name"] for s in meta["servers"]]
    sizes = meta["sizes"]
    panel_w = (W - LEFT - 3 * GAP) / 2
    rows = len(servers) * len(sizes)
    h = TOP + rows * ROW + len(servers) * 8 + 60
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{h:.0f}" font-family="sans-serif" font-size="12">',
           f'<rect width="{W}" height="{h:.0f}" fill="white"/>',
           f'<text x="{W / 2}" y="24" text-anchor="middle" font-size="16">barrage fan-out, one room, '
           f'{"throughput" if mode == "saturate" else "latency"} runs ({meta["stamp"]})</text>']
    panels = [("deliveries/s (log; higher is better)", "delivered_per_s", "{:,.0f}"), ("server CPU s per 1M deliveries (log; lower is better)", "cpu_s_per_million_deliveries", "{:.2f}")]
    for p, (title, key, fmt) in enumerate(panels):
        x0 = LEFT + GAP + p * (panel_w + GAP)
        vals = [runs.get((m, mode, s), {}).get(key) for s in servers for m in sizes]
        vals = [v for v in vals if v]
        if not vals:
            continue
        lo, hi = 10 ** math.floor(math.log10(min(vals))), 10 ** math.ceil(math.log10(max(vals)))
        if lo == hi:
            hi *= 10
        px = lambda v: x0 + panel_w * (math.log10(v) - math.log10(lo)) / (math.log10(hi) - math.log10(lo))
        out.append(f'<text x="{x0 + panel_w / 2}" y="{TOP - 24}" text-anchor="middle" font-size="14">{title}</text>')
        decade = lo
        while decade <= hi:
            out.append(f'<line x1="{px(decade):.1f}" x2="{px(decade):.1f}" y1="{TOP - 12}" y2="{h - 50}" stroke="#ddd"/>')
            out.append(f'<text x="{px(decade):.1f}" y="{h - 36}" text-anchor="middle">{short(decade)}</text>')
            decade *= 10
        y = TOP
        for s in servers:
            if p == 0:
                out.append(f'<text x="{LEFT + GAP - 8}" y="{y + ROW * len(sizes) / 2 + 4:.1f}" text-anchor="end">{s}</text>')
            for i, m in enumerate(sizes):
                v = runs.get((m, mode, s), {}).get(key)
                if v:
                    out.append(f'<rect x="{x0}" y="{y + 2}" width="{max(px(v) - x0, 1):.1f}" height="{ROW - 4}" fill="{COLOURS[i % 4]}"/>')
                    out.append(f'<text x="{px(v) + 4:.1f}" y="{y + ROW - 5}" font-size="10">{fmt.format(v)}</text>')
                else:
                    why = "n/a" if "na" in runs.get((m, mode, s), {}) else "–"
                    out.append(f'<text x="{x0 + 4}" y="{y + ROW - 5}" font-size="10" fill="#888">{why}</text>')
                y += ROW
            y += 8
    for i, m in enumerate(sizes):
        lx = LEFT + GAP + i * 160
        out.append(f'<rect x="{lx}" y="{h - 22}" width="14" height="10" fill="{COLOURS[i % 4]}"/>')
        out.append(f'<text x="{lx + 20}" y="{h - 13}">{m:,} members</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def short(v):
    for unit, div in (("M", 1e6), ("k", 1e3)):
        if v >= div:
            return f"{v / div:g}{unit}"
    return f"{v:g}"


if __name__ == "__main__":
    main()
