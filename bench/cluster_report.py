#!/usr/bin/env python3
"""The table bench/cluster.sh appends to bench/RESULTS.md: one section per room count and mode,
one row per server, ratios of barrage-3 against every other row measured in the same run.

    python3 bench/cluster_report.py bench/out/cluster-STAMP "COMMAND" >> bench/RESULTS.md
"""
import json
import os
import platform
import sys


def machine():
    cores = os.cpu_count()
    model = "?"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
        mem = next(int(l.split()[1]) for l in open("/proc/meminfo") if l.startswith("MemTotal"))
    except (OSError, StopIteration):
        mem = 0
    return f"{cores} cores ({model}), {mem / 1024 / 1024:.0f} GiB, Linux {platform.release()}"


def load(out):
    runs = {}
    for f in sorted(os.listdir(os.path.join(out, "runs"))):
        if not f.endswith(".json"):
            continue
        rooms, mode, server = f[:-5].split("-", 2)
        r = json.load(open(os.path.join(out, "runs", f)))
        cpu = os.path.join(out, "runs", f[:-5] + ".redis-cpu.txt")
        if os.path.exists(cpu):
            before, after = (float(x) for x in open(cpu).read().split())
            r["redis_cpu_s"] = after - before
        runs.setdefault((int(rooms), mode), []).append((server, r))
    return runs


def ms(ns):
    return f"{ns / 1e6:.1f}" if ns else "–"


def main():
    out, command = sys.argv[1], sys.argv[2]
    runs = load(out)
    stamp = os.path.basename(out.rstrip("/")).removeprefix("cluster-")
    print(f"\n## {stamp} cluster fan-out: three nodes sharing rooms through Redis, against one node and the anchors\n")
    print(f"- Machine: {machine()}; every node, Redis and the load generator on the same 2 cores (loopback).")
    print(f"- Command: `{command}`.")
    print("- barrage-1: one node, 2 shards, no Redis. barrage-3: three nodes (1 shard each) on one private "
          "redis-server, rooms owned by one node each, members spread evenly (member i on node i mod 3), "
          "publishing through node 0's API. socketio-N / soketi-N: N processes (one event loop each), "
          "N = 3 on the same Redis through @socket.io/redis-adapter / soketi's Redis adapter; Socket.IO "
          "publishes through a raw WebSocket on process 0 (`io.to(room).emit`), soketi through its signed "
          "HTTP events API on process 0.")
    print("- Columns: deliveries/s = messages received by members per second in the window; latency from "
          "publish to each member and to the room's last member (reach-all), ms; CPU = CPU seconds of the "
          "whole cluster (every node and Redis) per million deliveries, Redis's share beside it; lost = "
          "expected − delivered. Ratios are barrage-3 ÷ the row (above 1 is barrage-3 ahead for deliveries/s, "
          "below 1 for CPU and latency).")
    for (rooms, mode) in sorted(runs):
        rows = runs[(rooms, mode)]
        ref = dict(rows).get("barrage-3")
        what = "a fixed rate (latency)" if mode == "rate" else "saturating (closed loop, throughput)"
        print(f"\n### {rooms} room(s), {mode}: {what}\n")
        print("| server | deliveries/s | p50 | p99 | reach-all p99 | CPU s/1M | of it Redis | lost | "
              "÷ deliveries/s | ÷ CPU | ÷ reach-all p99 |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for server, r in rows:
            if "delivered_per_s" not in r:
                print(f"| {server} | {r.get('failed', 'failed')} |||||||||| |")
                continue
            lat, reach = r.get("latency_ns") or {}, r.get("reach_all_ns") or {}
            cpu = r.get("cpu_s_per_million_deliveries")
            window = r.get("delivered_in_window") or 0
            redis = r.get("redis_cpu_s")
            # Redis's CPU over the whole run (subscribe and drain included) per million window
            # deliveries: an upper bound of its share.
            redis_cell = f"≤ {redis / (window / 1e6):.2f}" if redis is not None and window else "–"
            ratios = ["", "", ""]
            if ref and "delivered_per_s" in ref and server != "barrage-3":
                rcpu = ref.get("cpu_s_per_million_deliveries")
                rreach = (ref.get("reach_all_ns") or {}).get("p99")
                ratios = [
                    f"{ref['delivered_per_s'] / r['delivered_per_s']:.2f}×" if r["delivered_per_s"] else "–",
                    f"{rcpu / cpu:.2f}×" if rcpu and cpu else "–",
                    f"{rreach / reach['p99']:.2f}×" if rreach and reach.get("p99") else "–",
                ]
            print(f"| {server} | {r['delivered_per_s']:,.0f} | {ms(lat.get('p50'))} | {ms(lat.get('p99'))} | "
                  f"{ms(reach.get('p99'))} | {cpu or 0:.2f} | {redis_cell} | {r.get('lost', 0):,} | "
                  + " | ".join(ratios) + " |")
    print(f"\n- Reports: `{out}/runs/`.")


if __name__ == "__main__":
    main()
