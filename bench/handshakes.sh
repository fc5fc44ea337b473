#!/usr/bin/env bash
# Handshake rate side by side: ramps N connections (`barrage-load connect`, all joined, one block
# delivered to each, then drop) against this build and an earlier one (BASE_BIN), alternating,
# REPEAT times each, fresh processes and a fresh source /24 per run; appends the medians of the
# mean and peak handshakes/s and of the ramp time to bench/RESULTS.md.
#
#   BASE_BIN=/tmp/before/barrage bench/handshakes.sh            # 100,000 connections, 3 runs each
#   BASE_BIN=/tmp/before/barrage N=200000 REPEAT=5 bench/handshakes.sh
#
# Needs root (sysctls: tuning/apply.sh, restored on exit). Loopback only; every run is bounded by
# the generator's --deadline-s and stops by itself.
set -euo pipefail
cd "$(dirname "$0")/.."

N="${N:-100000}"
REPEAT="${REPEAT:-3}"
RATE="${RATE:-100000}"
ROOMS="${ROOMS:-100}"
THREADS="${THREADS:-2}"
PORT="${PORT:-18760}"
API_PORT="${API_PORT:-19760}"
SOURCE_NET="${SOURCE_NET:-120}"
BASE_BIN="${BASE_BIN:?BASE_BIN: an earlier barrage binary to compare with}"
STAMP="$(date -u +%Y%m%dT%H%M%SZ)"
OUT="bench/out/handshakes-$STAMP"
SOURCES=$((N / 51000 + 2))
mkdir -p "$OUT"

cargo build --release --quiet --bin barrage --bin barrage-load
gateway_pid=""
stop_gateway() {
  [[ -z $gateway_pid ]] && return 0
  kill -TERM "$gateway_pid" 2> /dev/null || true
  sleep 0.3
  kill -TERM "$gateway_pid" 2> /dev/null || true
  for _ in $(seq 100); do kill -0 "$gateway_pid" 2> /dev/null || break; sleep 0.1; done
  kill -KILL "$gateway_pid" 2> /dev/null || true
  wait "$gateway_pid" 2> /dev/null || true
  gateway_pid=""
}
cleanup() {
  stop_gateway
  STATE="$OUT/sysctl.saved" tuning/apply.sh --restore
}
trap cleanup EXIT
STATE="$OUT/sysctl.saved" tuning/apply.sh

k=0
for rep in $(seq "$REPEAT"); do
  for name in barrage base; do
    bin=./target/release/barrage
    edge=(--addr-conn-rate-per-s 0 --addr-request-rate-per-s 0)
    # Builds from before the per-address edge rates (issue 10) lack the flags (and the limits).
    [[ $name == base ]] && { bin="$BASE_BIN"; "$bin" --help | grep -q addr-conn-rate || edge=(); }
    net=$((SOURCE_NET + k))
    k=$((k + 1))
    taskset -c 0,1 "$bin" --listen "127.0.0.1:$PORT" --api-listen "127.0.0.1:$API_PORT" \
      --connections-max $((N + 10000)) --rooms-max $((ROOMS * 2)) \
      --handshake-timeout-ms 120000 --heartbeat-ms 1800000 --idle-timeout-ms 3600000 \
      ${edge[@]+"${edge[@]}"} > "$OUT/$name-$rep.server.log" 2>&1 &
    gateway_pid=$!
    for _ in $(seq 100); do ss -Hltn "sport = :$PORT" | grep -q . && break; sleep 0.1; done
    status=0
    nice -n 19 ./target/release/barrage-load connect --target "127.0.0.1:$PORT" --api "127.0.0.1:$API_PORT" \
      --connections "$N" --rooms "$ROOMS" --rate "$RATE" --hold-s 1 \
      --sources "127.0.$net.1-127.0.$net.$SOURCES" --ports 10000-60999 --threads "$THREADS" \
      --gateway-pid "$gateway_pid" --deadline-s 300 --json "$OUT/$name-$rep.json" > "$OUT/$name-$rep.load.log" 2>&1 \
      || status=$?
    stop_gateway
    echo "$name run $rep: exit $status"
    sleep 2
  done
done

python3 - "$OUT" "$N" "$REPEAT" "$BASE_BIN" "$STAMP" >> bench/RESULTS.md << 'EOF'
import glob, json, os, platform, statistics, sys
out, n, repeat, base, stamp = sys.argv[1:6]
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
rows = {}
for name in ("barrage", "base"):
    runs = [json.load(open(p)) for p in sorted(glob.glob(f"{out}/{name}-*.json"))]
    rows[name] = runs
def med(runs, key):
    v = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(v) if v else None
print(f"\n## {stamp} handshakes: {int(n):,} connections ramped, this build against an earlier one, {repeat} runs each alternating\n")
print(f"- Machine: {os.cpu_count()} cores ({cpu}), Linux {platform.release()}; gateway pinned to cores 0,1, generator "
      "(`barrage-load connect`, 2 threads, nice 19) on the same cores; loopback; tuning/apply.sh applied and restored.")
print(f"- Command: `BASE_BIN={base} N={n} REPEAT={repeat} bench/handshakes.sh`; base = `{base}`. Each run: a fresh gateway, "
      "a fresh source /24, every connection joins one of 100 rooms and receives one block.\n")
print("| build | runs passed | handshakes/s, mean over the ramp (median; each run) | peak second (median) | ramp s (median) |")
print("|---|---:|---|---:|---:|")
for name, runs in rows.items():
    each = ", ".join(f"{r['handshakes_per_s_mean']:,.0f}" for r in runs)
    print(f"| {name} | {sum(bool(r.get('passed')) for r in runs)}/{len(runs)} | {med(runs, 'handshakes_per_s_mean'):,.0f} ({each}) "
          f"| {med(runs, 'handshakes_per_s_peak'):,.0f} | {med(runs, 'ramp_s'):.2f} |")
b, a = med(rows["barrage"], "handshakes_per_s_mean"), med(rows["base"], "handshakes_per_s_mean")
if a and b:
    print(f"\n- Ratio of the medians (this build ÷ base): {b / a:.2f}×. Reports: `{out}/`.")
EOF
echo "appended to bench/RESULTS.md; runs in $OUT"
