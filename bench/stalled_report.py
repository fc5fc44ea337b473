#!/usr/bin/env python3
"""Samples and reports bench/stalled.sh: what readers that never read cost the kernel, per
gateway variant. Standard library only.

Usage:
  stalled_report.py sample PID PORT API OUT.tsv   one row a second until PID exits or the file
                                                  STOP (beside OUT.tsv) appears; LOADGEN_DONE
                                                  beside it marks the load generator's end
  stalled_report.py report DIR                    markdown for bench/RESULTS.md (DIR/meta.json,
                                                  DIR/<variant>/samples.tsv and load.json)

A row: time; /proc/net/sockstat's TCP line (sockets in use, orphans, TIME_WAIT, and `mem`, the
pages the TCP stack has allocated, system-wide: both ends of every loopback pair); the gateway's
VmRSS; from `ss -tmn` over the gateway's port (all states), its sockets, the sum of their queued
send memory (skmem `w`, what unsent and unacknowledged bytes pin) and of their send buffer limits
(`tb`), and how many are no longer established (orphans after a close, FIN-WAIT, ...); and the
gateway's counters (websockets, messages accepted, slow-consumer closes, resets).

The phases of a run, found in its rows:
  before  rows with every member subscribed and nothing published yet (the load generator's
          --idle-s): the median of each column;
  during  rows in the 4 s before the first slow-consumer close (the stalled readers' buffers are
          full by then: they are closed only after slow_consumer_ms of shedding, which starts
          when their send buffers are full): the median of each column;
  after   rows from 3 s after the last stalled reader was closed until the load generator ends
          (the stalled readers still hold their sockets): the median of each column;
  exit    2 s after the load generator ended (its sockets closed).
"""
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import urllib.request

PAGE = os.sysconf("SC_PAGE_SIZE")
COLUMNS = ("t", "tcp_inuse", "tcp_orphan", "tcp_tw", "tcp_mem_bytes", "rss_bytes", "gw_sockets",
           "gw_not_established", "gw_w_bytes", "gw_tb_bytes", "websockets", "accepted",
           "closed_slow", "resets", "loadgen_running")
SERIES = {
    "websockets": "barrage_websockets",
    "accepted": "barrage_messages_accepted_total",
    "closed_slow": 'barrage_closed_total{reason="slow_consumer"}',
    "resets": "barrage_resets_total",
}


def main():
    if len(sys.argv) == 6 and sys.argv[1] == "sample":
        return sample(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5])
    if len(sys.argv) == 3 and sys.argv[1] == "report":
        return print(report(sys.argv[2]))
    sys.exit(__doc__)


# --- sampling ------------------------------------------------------------------------------------

def sockstat():
    for line in open("/proc/net/sockstat"):
        if line.startswith("TCP:"):
            f = line.split()[1:]
            v = dict(zip(f[0::2], (int(x) for x in f[1::2])))
            return v.get("inuse", 0), v.get("orphan", 0), v.get("tw", 0), v.get("mem", 0) * PAGE
    return 0, 0, 0, 0


def rss(pid):
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def gateway_sockets(port):
    """(sockets, not established, sum of skmem w, sum of skmem tb) over sport = port."""
    out = subprocess.run(["ss", "-Htmn", f"( sport = :{port} )"], capture_output=True, text=True).stdout
    n = not_est = w = tb = 0
    for line in out.splitlines():
        if not line.startswith((" ", "\t")) and line.strip():
            n += 1
            not_est += not line.startswith("ESTAB")
        m = re.search(r"skmem:\(([^)]*)\)", line)
        if m:
            fields = dict(re.match(r"([a-z]+)(\d+)", f).groups() for f in m.group(1).split(","))
            w += int(fields.get("w", 0))
            tb += int(fields.get("tb", 0))
    return n, not_est, w, tb


def metrics(api):
    try:
        text = urllib.request.urlopen(f"http://{api}/metrics", timeout=2).read().decode()
    except OSError:
        return {k: -1 for k in SERIES}
    sums = {k: 0 for k in SERIES}
    for line in text.splitlines():
        if line.startswith("#") or " " not in line:
            continue
        name, value = line.rsplit(" ", 1)
        bare = re.sub(r'shard="\d+",?', "", name).replace("{}", "")
        for k, s in SERIES.items():
            if bare == s:
                sums[k] += int(float(value))
    return sums


def sample(pid, port, api, out):
    stop = os.path.join(os.path.dirname(out), "STOP")
    loadgen_done = os.path.join(os.path.dirname(out), "LOADGEN_DONE")
    start = time.time()
    with open(out, "w") as f:
        f.write("\t".join(COLUMNS) + "\n")
        while os.path.exists(f"/proc/{pid}") and not os.path.exists(stop):
            t0 = time.time()
            inuse, orphan, tw, mem = sockstat()
            n, not_est, w, tb = gateway_sockets(port)
            m = metrics(api)
            row = [f"{t0 - start:.1f}", inuse, orphan, tw, mem, rss(pid), n, not_est, w, tb,
                   m["websockets"], m["accepted"], m["closed_slow"], m["resets"],
                   int(not os.path.exists(loadgen_done))]
            f.write("\t".join(str(x) for x in row) + "\n")
            f.flush()
            time.sleep(max(0.0, 1.0 - (time.time() - t0)))


# --- the report ----------------------------------------------------------------------------------

def rows(tsv):
    lines = open(tsv).read().split("\n")
    head = lines[0].split("\t")
    out = []
    for line in lines[1:]:
        if line.strip():
            out.append({k: float(v) for k, v in zip(head, line.split("\t"))})
    return out


def phases(rs, members, stalled):
    """before / during / after / exit rows (None where the run did not reach the phase)."""
    running = [r for r in rs if r["loadgen_running"]]
    idle = [r for r in running if r["websockets"] >= members and r["accepted"] == 0]
    published = [r for r in running if r["accepted"] > 0]
    first_close = next((r["t"] for r in published if r["closed_slow"] > 0), None)
    full = [r for r in published if first_close is not None and first_close - 4 <= r["t"] < first_close]
    closed = [r for r in running if r["closed_slow"] >= stalled]
    after = [r for r in running if closed and r["t"] >= closed[0]["t"] + 3]
    done = [r for r in rs if not r["loadgen_running"]]
    exit_ = [r for r in done if r["t"] >= done[0]["t"] + 2] if done else []
    return {
        "before": median(idle),
        "during": median(full),
        "after": median(after),
        "exit": exit_[0] if exit_ else None,
        "closed_at": closed[0]["t"] - published[0]["t"] if closed and published else None,
    }


def median(rs):
    """Each column's median over rows (None for no rows)."""
    return {k: statistics.median(r[k] for r in rs) for k in rs[0]} if rs else None


def mib(b):
    return f"{b / 2**20:,.0f}"


def report(out_dir):
    meta = json.load(open(os.path.join(out_dir, "meta.json")))
    members, stalled = meta["members"], meta["stalled"]
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    mem = int(next(l.split()[1] for l in open("/proc/meminfo") if l.startswith("MemTotal"))) / 2**20
    lines = [
        f"\n## {meta['stamp']} stalled readers: {members:,} members at full fan-out, {stalled:,} never read",
        "",
        f"- Machine: {os.cpu_count()} cores ({cpu}), {mem:.0f} GiB, Linux {platform.release()}; gateway and load "
        "generator on the same box, loopback, tuning/apply.sh applied and restored (tcp_wmem max 4 MiB).",
        f"- Command: `{meta['command']}`.",
        f"- Load: one room, {meta['rate']:g} messages/s of {meta['message_bytes']} B (every member is sent every "
        f"message: {meta['rate'] * meta['message_bytes'] / 1e3:,.0f} KB/s per member), block interval "
        f"{meta['block_interval_ms']} ms, slow_consumer_ms {meta['slow_consumer_ms']}, send queue 16 frames; "
        f"members 0..{stalled - 1} subscribe and never read again (`barrage-load fanout --stalled {stalled}`), "
        "holding their sockets open for the whole run.",
        "- Variants (one binary, knobs): "
        + "; ".join(f"**{v['name']}** `{v['flags'] or '(the defaults)'}`" for v in meta["variants"]) + ".",
        "- Columns: TCP mem = `/proc/net/sockstat` TCP `mem` (pages × 4 KiB, system-wide: both ends of every "
        "loopback pair, so the readers' side too); gateway Σw = queued send memory of the gateway's sockets "
        "(ss skmem `w`, all states), with how many of them are no longer established (orphaned by a close); "
        "RSS = gateway VmRSS. *before*: all subscribed, nothing published (median); *during*: the stalled readers' "
        "buffers full: median of the 4 s before the first slow-consumer close; *after*: median from 3 s after the "
        "last stalled reader was closed until the load generator ended (the stalled readers still hold their "
        "sockets); *exit*: 2 s after the load generator closed everything.",
        "",
        "| variant | phase | TCP mem (MiB) | gateway Σw (MiB) | gateway sockets not established | TCP orphans | gateway RSS (MiB) | slow closes | resets |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    summary = []
    for v in meta["variants"]:
        name = v["name"]
        tsv = os.path.join(out_dir, name, "samples.tsv")
        if not os.path.exists(tsv):
            lines.append(f"| {name} | (no samples) | | | | | | | |")
            continue
        p = phases(rows(tsv), members, stalled)
        for phase in ("before", "during", "after", "exit"):
            r = p[phase]
            if r is None:
                lines.append(f"| {name} | {phase}: not reached | | | | | | | |")
                continue
            lines.append(
                f"| {name} | {phase} | {mib(r['tcp_mem_bytes'])} | {mib(r['gw_w_bytes'])} | "
                f"{r['gw_not_established']:,.0f} | {r['tcp_orphan']:,.0f} | {mib(r['rss_bytes'])} | "
                f"{r['closed_slow']:,.0f} | {r['resets']:,.0f} |")
        load = {}
        try:
            load = json.load(open(os.path.join(out_dir, name, "load.json")))
        except (OSError, ValueError):
            pass
        d, a, b = p["during"], p["after"], p["before"]
        if d and a and b:
            per = (d["gw_w_bytes"] - b["gw_w_bytes"]) / stalled
            summary.append(
                f"  - **{name}**: TCP memory {mib(b['tcp_mem_bytes'])} MiB before → {mib(d['tcp_mem_bytes'])} MiB "
                f"with the stalled readers' buffers full (gateway Σw ≈ {per / 1024:,.0f} KiB per stalled reader, "
                "an upper bound: the readers' own in-flight sends count too) → "
                f"{mib(a['tcp_mem_bytes'])} MiB after their closes (gateway Σw {mib(a['gw_w_bytes'])} MiB in "
                f"{a['gw_not_established']:,.0f} orphaned sockets); all {stalled:,} closed "
                f"{p['closed_at']:.0f} s after publishing began; load generator: {load.get('delivered_per_s', 0):,.0f} "
                f"deliveries/s to the readers, lost {load.get('lost', '?')}, passed {load.get('passed', '?')}.")
    lines += ["", "- Summary:"] + summary
    lines.append(f"- Samples (one row a second) and load generator reports: `{out_dir}/`.")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
