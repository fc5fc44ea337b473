#!/usr/bin/env bash
# Client sends through the send hook, side by side with plain sends in one run (issue 14):
# CLIENTS signed-in clients each send a chat line with an id and wait for its ack, for
# DURATION_S; `hook` runs with --hook-send-url pointing at a trivial backend (barrage-load
# backend: allows every call, JSON, keep-alive), `plain` without. Reports acked sends/s,
# send-to-ack latency p50/p99 (the block tick is 1 ms, so the ack waits little for its seq),
# the gateway's CPU per send, the backend's, and the mean batch per hook request; appends a
# table to bench/RESULTS.md.
#
#   bench/hooks.sh
#   CLIENTS=128 DURATION_S=10 REPEAT=3 bench/hooks.sh
#
# Gateway, backend and generator share cores 0,1 (generator at nice 19). Loopback only; every
# run is bounded by DURATION_S.
set -euo pipefail
cd "$(dirname "$0")/.."

CLIENTS="${CLIENTS:-64}"
ROOMS="${ROOMS:-8}"
DURATION_S="${DURATION_S:-5}"
REPEAT="${REPEAT:-3}"
PORT="${PORT:-18790}"
API_PORT="${API_PORT:-9391}"
BACKEND_PORT="${BACKEND_PORT:-18801}"
SECRET="bench-secret-0123456789-0123456789"
LOADGEN="./target/release/barrage-load"

STAMP="$(date -u +%Y%m%dT%H%M%SZ)"
OUT="bench/out/hooks-$STAMP"
COMMAND="CLIENTS=$CLIENTS ROOMS=$ROOMS DURATION_S=$DURATION_S REPEAT=$REPEAT bench/hooks.sh"
mkdir -p "$OUT"
cargo build --release --quiet --bin barrage --bin barrage-load

gw="" be=""
stop_all() {
  for p in $gw $be; do kill "$p" 2> /dev/null || true; wait "$p" 2> /dev/null || true; done
  gw="" be=""
}
trap stop_all EXIT

taskset -c 0,1 "$LOADGEN" backend --listen "127.0.0.1:$BACKEND_PORT" > "$OUT/backend.log" 2>&1 &
be=$!
for r in $(seq "$REPEAT"); do
  # Alternate the order so neither mode always runs on a warmer box.
  modes="hook plain"
  (( r % 2 == 0 )) && modes="plain hook"
  for mode in $modes; do
    extra=()
    [[ $mode == hook ]] && extra=(--hook-send-url "http://127.0.0.1:$BACKEND_PORT/send")
    taskset -c 0,1 ./target/release/barrage --listen "127.0.0.1:$PORT" --api-listen "127.0.0.1:$API_PORT" \
      --jwt-secret "$SECRET" --send-rate-per-s 0 --room-rate-per-s 0 --block-interval-ms 1 "${extra[@]}" \
      > "$OUT/$mode-$r.gateway.log" 2>&1 &
    gw=$!
    for _ in $(seq 100); do curl -s -m 1 "http://127.0.0.1:$API_PORT/healthz" > /dev/null && break; sleep 0.05; done
    echo "== $mode (run $r)"
    nice -n 19 taskset -c 0,1 "$LOADGEN" sends --ws "127.0.0.1:$PORT" --secret "$SECRET" --clients "$CLIENTS" \
      --rooms "$ROOMS" --duration-s "$DURATION_S" --server-pid "$gw" --backend-pid "$be" \
      --json "$OUT/$mode-$r.json" --label "$mode" || true
    curl -s "http://127.0.0.1:$API_PORT/metrics" > "$OUT/$mode-$r.metrics"
    kill "$gw"; wait "$gw" 2> /dev/null || true; gw=""
  done
done

python3 - "$OUT" "$COMMAND" "$STAMP" >> bench/RESULTS.md << 'EOF'
import glob, json, os, platform, re, statistics, sys
out, command, stamp = sys.argv[1:]
runs = {}
for f in sorted(glob.glob(os.path.join(out, "*.json"))):
    r = json.load(open(f))
    m = open(f[:-5] + ".metrics").read()
    series = lambda name: sum(float(v) for v in re.findall(r"^" + re.escape(name) + r" (\S+)$", m, re.M))
    reqs = series('barrage_hook_requests_total{hook="send",result="ok"}')
    r["batch"] = series('barrage_hook_batched_calls_total{hook="send"}') / reqs if reqs else None
    runs.setdefault(r["label"], []).append(r)
model = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
med = lambda rs, k: statistics.median(r[k] or 0 for r in rs)
print(f"\n## {stamp} client sends through the send hook, against plain sends\n")
print(f"- Machine: {os.cpu_count()} cores ({model}), Linux {platform.release()}; gateway (2 shards), trivial backend (`barrage-load backend`) and generator on cores 0,1, loopback; block tick 1 ms.")
print(f"- Command: `{command}`; each client has one send in flight and waits for its ack (the seq comes when the block is cut).")
print("- Medians of the runs; gateway and backend µs/send = their CPU over the window ÷ acked sends.\n")
print("| mode | acked sends/s | ack p50 ms | ack p99 ms | gateway µs/send | backend µs/send | calls per hook request | runs: sends/s, p50, p99 |")
print("|---|---:|---:|---:|---:|---:|---:|---|")
for mode in ["plain", "hook"]:
    rs = runs.get(mode)
    if not rs:
        continue
    each = "; ".join(f"{r['sends_per_s']:,.0f}, {r['ack_p50_ms']:.2f}, {r['ack_p99_ms']:.2f}" for r in rs)
    batch = f"{statistics.median(r['batch'] for r in rs):.1f}" if mode == "hook" else "-"
    backend = f"{med(rs, 'backend_cpu_us_per_send'):.1f}" if mode == "hook" else "-"
    print(f"| {mode} | {med(rs, 'sends_per_s'):,.0f} | {med(rs, 'ack_p50_ms'):.2f} | {med(rs, 'ack_p99_ms'):.2f} | {med(rs, 'server_cpu_us_per_send'):.1f} | {backend} | {batch} | {each} |")
if "plain" in runs and "hook" in runs:
    p, h = runs["plain"], runs["hook"]
    print(f"\n- The hook adds {med(h, 'ack_p50_ms') - med(p, 'ack_p50_ms'):+.2f} ms at p50 and {med(h, 'ack_p99_ms') - med(p, 'ack_p99_ms'):+.2f} ms at p99, {med(h, 'server_cpu_us_per_send') - med(p, 'server_cpu_us_per_send'):+.1f} µs of gateway CPU per send; sends/s {med(h, 'sends_per_s') / med(p, 'sends_per_s'):.2f}× plain.")
EOF
echo "appended to bench/RESULTS.md; reports under $OUT"
