#!/usr/bin/env bash
# What the send-buffer cap (websocket.send_buffer_bytes) costs fast readers: bench/fanout.sh's
# barrage rows (one room of MEMBERS, 100-byte messages, saturate with WINDOW in flight and deep
# with DEEP_WINDOW, same gateway flags and generator settings) with the default cap and with
# kernel autotuning (--send-buffer-bytes 0), alternating ROUNDS times so drift shows. Prints one
# line per run and appends a table to bench/RESULTS.md.
#
#   bench/sndbuf_fanout.sh
#   ROUNDS=1 MODES=deep bench/sndbuf_fanout.sh
#
# Needs root (sysctls: tuning/apply.sh, restored on exit). Loopback only; bounded by --deadline-s.
set -euo pipefail
cd "$(dirname "$0")/.."

MEMBERS="${MEMBERS:-10000}"
MODES="${MODES:-saturate deep}"
WINDOW="${WINDOW:-32}"
DEEP_WINDOW="${DEEP_WINDOW:-256}"
ROUNDS="${ROUNDS:-2}"
DURATION_S="${DURATION_S:-10}"
PORT_BASE="${PORT_BASE:-18800}"
API_PORT="${API_PORT:-9290}"
STAMP="$(date -u +%Y%m%dT%H%M%SZ)"
OUT="bench/out/sndbuf-$STAMP"
COMMAND="MEMBERS=$MEMBERS MODES=\"$MODES\" WINDOW=$WINDOW DEEP_WINDOW=$DEEP_WINDOW ROUNDS=$ROUNDS DURATION_S=$DURATION_S bench/sndbuf_fanout.sh"
mkdir -p "$OUT"
cargo build --release --quiet --bin barrage --bin barrage-load

server_pid=""
stop_server() {
  [[ -z "$server_pid" ]] && return 0
  kill -TERM "$server_pid" 2> /dev/null || true
  for _ in $(seq 100); do kill -0 "$server_pid" 2> /dev/null || break; sleep 0.1; done
  kill -KILL "$server_pid" 2> /dev/null || true
  wait "$server_pid" 2> /dev/null || true
  server_pid=""
}
cleanup() {
  stop_server
  STATE="bench/out/sysctl.saved" tuning/apply.sh --restore
}
trap cleanup EXIT
STATE="bench/out/sysctl.saved" tuning/apply.sh

run=0
for mode in $MODES; do
  window=$WINDOW
  [[ $mode == deep ]] && window=$DEEP_WINDOW
  for round in $(seq "$ROUNDS"); do
    # Alternate which goes first each round.
    order="capped autotuned"
    ((round % 2 == 0)) && order="autotuned capped"
    for variant in $order; do
      run=$((run + 1))
      port=$((PORT_BASE + run))
      extra=()
      [[ $variant == autotuned ]] && extra=(--send-buffer-bytes 0)
      taskset -c 0,1 ./target/release/barrage --listen "127.0.0.1:$port" --api-listen "127.0.0.1:$API_PORT" \
        --shards 2 --connections-max $((MEMBERS + 10000)) --block-messages-max 1000 \
        --pending-messages-max 100000 --room-rate-per-s 0 --send-queue-frames-max 64 \
        --block-interval-ms $((MEMBERS / 200 > 50 ? MEMBERS / 200 : 50)) \
        --handshake-timeout-ms 120000 --heartbeat-ms 1800000 --idle-timeout-ms 3600000 \
        "${extra[@]}" > "$OUT/$mode-$round-$variant.server.log" 2>&1 &
      server_pid=$!
      for _ in $(seq 300); do ss -Hltn "sport = :$port" | grep -q . && break; sleep 0.1; done
      json="$OUT/$mode-$round-$variant.json"
      nice -n 19 ./target/release/barrage-load fanout --target "127.0.0.1:$port" --api "127.0.0.1:$API_PORT" \
        --kind barrage --members "$MEMBERS" --duration-s "$DURATION_S" --warmup-s 2 --json "$json" \
        --server-pid "$server_pid" --message-bytes 100 --publishers 2 \
        --sources "127.0.$((20 + run)).1-127.0.$((20 + run)).2" --ports 10000-60999 --threads 2 \
        --label "$variant" --deadline-s 600 --saturate --window "$window" > "$OUT/$mode-$round-$variant.load.log" 2>&1 || true
      stop_server
      python3 - "$json" "$mode" "$variant" << 'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"{sys.argv[2]:8} {sys.argv[3]:9} {r['delivered_per_s']:>12,.0f} deliveries/s  CPU {r.get('cpu_s_per_million_deliveries') or 0:.3f} s/1M  "
      f"reach-all p99 {r['reach_all_ns']['p99'] / 1e6:,.0f} ms  lost {r['lost']}")
PY
      sleep 2
    done
  done
done

python3 - "$OUT" "$STAMP" "$COMMAND" "$MEMBERS" >> bench/RESULTS.md << 'PY'
import glob, json, os, platform, statistics, sys
out, stamp, command, members = sys.argv[1:]
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
runs = {}
for f in sorted(glob.glob(f"{out}/*.json")):
    mode, _, variant = os.path.basename(f)[:-5].split("-")
    runs.setdefault((mode, variant), []).append(json.load(open(f)))
print(f"\n## {stamp} send-buffer cap and fan-out: {int(members):,} members, capped (32 KiB) against autotuned\n")
print(f"- Machine: {os.cpu_count()} cores ({cpu}), Linux {platform.release()}; loopback, tuning/apply.sh applied and restored.")
print(f"- Command: `{command}`; bench/fanout.sh's barrage flags and generator settings; runs alternate the order.")
print("\n| mode | variant | deliveries/s (each run) | median | CPU s/1M (median) | reach-all p99 ms (median) | lost |")
print("|---|---|---|---:|---:|---:|---:|")
for (mode, variant), rs in sorted(runs.items()):
    d = [r["delivered_per_s"] for r in rs]
    c = [r.get("cpu_s_per_million_deliveries") or 0 for r in rs]
    p = [r["reach_all_ns"]["p99"] / 1e6 for r in rs]
    print(f"| {mode} | {variant} | {', '.join(f'{x / 1e6:.2f}M' for x in d)} | {statistics.median(d) / 1e6:.2f}M | "
          f"{statistics.median(c):.3f} | {statistics.median(p):,.0f} | {sum(r['lost'] for r in rs)} |")
print(f"\n- Reports: `{out}/`.")
PY
echo "appended to bench/RESULTS.md; reports under $OUT"
