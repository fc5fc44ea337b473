#!/usr/bin/env bash
# Ingestion through the business API, side by side in one run (issue 14): single publishes (one
# protobuf PublishRequest per request), protobuf batches and NDJSON batches of BATCH items, and a
# streamed NDJSON request per connection in chunks of BATCH lines, over
# CONNECTIONS keep-alive connections, round ROOMS rooms with no members (the cost of taking a
# message in: the API, the owner's push, the block cut and its encoding, not the fan-out).
# Reports messages/s and the gateway's CPU µs per message; appends a table to bench/RESULTS.md.
#
#   bench/ingest.sh
#   BATCH=100 CONNECTIONS=8 DURATION_S=5 bench/ingest.sh
#
# Gateway and generator share cores 0,1 (generator at nice 19). Loopback only; every run is
# bounded by DURATION_S.
set -euo pipefail
cd "$(dirname "$0")/.."

MODES="${MODES:-single batch ndjson stream}"
BATCH="${BATCH:-1000}"
CONNECTIONS="${CONNECTIONS:-4}"
ROOMS="${ROOMS:-1000}"
MESSAGE_BYTES="${MESSAGE_BYTES:-100}"
DURATION_S="${DURATION_S:-10}"
REPEAT="${REPEAT:-2}"
PORT="${PORT:-18700}"
API_PORT="${API_PORT:-9390}"
LOADGEN="${LOADGEN:-./target/release/barrage-load}"

STAMP="$(date -u +%Y%m%dT%H%M%SZ)"
OUT="bench/out/ingest-$STAMP"
COMMAND="MODES=\"$MODES\" BATCH=$BATCH CONNECTIONS=$CONNECTIONS ROOMS=$ROOMS MESSAGE_BYTES=$MESSAGE_BYTES DURATION_S=$DURATION_S REPEAT=$REPEAT bench/ingest.sh"
mkdir -p "$OUT"
cargo build --release --quiet --bin barrage --bin barrage-load

gw=""
stop_gw() {
  [[ -n $gw ]] && { kill "$gw" 2> /dev/null || true; wait "$gw" 2> /dev/null || true; }
  gw=""
}
trap stop_gw EXIT

for r in $(seq "$REPEAT"); do
  for mode in $MODES; do
    taskset -c 0,1 ./target/release/barrage --listen "127.0.0.1:$PORT" --api-listen "127.0.0.1:$API_PORT" \
      --room-rate-per-s 0 --pending-messages-max 100000 --block-messages-max 1000 --rooms-max 100000 \
      --api-body-bytes-max 8388608 > "$OUT/$mode-$r.gateway.log" 2>&1 &
    gw=$!
    for _ in $(seq 100); do curl -s -m 1 "http://127.0.0.1:$API_PORT/healthz" > /dev/null && break; sleep 0.05; done
    echo "== $mode (run $r)"
    nice -n 19 taskset -c 0,1 "$LOADGEN" ingest --api "127.0.0.1:$API_PORT" --mode "$mode" --batch "$BATCH" \
      --connections "$CONNECTIONS" --rooms "$ROOMS" --message-bytes "$MESSAGE_BYTES" --duration-s "$DURATION_S" \
      --server-pid "$gw" --json "$OUT/$mode-$r.json" --label "$mode" || true
    stop_gw
  done
done

python3 - "$OUT" "$COMMAND" "$STAMP" >> bench/RESULTS.md << 'EOF'
import glob, json, os, platform, statistics, sys
out, command, stamp = sys.argv[1:]
runs = {}
for f in sorted(glob.glob(os.path.join(out, "*.json"))):
    r = json.load(open(f))
    runs.setdefault(r["mode"], []).append(r)
model = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
print(f"\n## {stamp} ingest: single publishes against batches, through the business API\n")
print(f"- Machine: {os.cpu_count()} cores ({model}), Linux {platform.release()}; gateway (2 shards) and generator on cores 0,1, loopback.")
print(f"- Command: `{command}`; rooms have no members (the intake's cost, not the fan-out's).")
print("- messages/s = messages the answers accepted ÷ the window; µs/message = gateway CPU over the window ÷ those messages; medians of the runs, each run's figure beside.\n")
print("| mode | items/request | messages/s (median) | gateway µs/message (median) | runs: messages/s, µs/message | refused | errors |")
print("|---|---:|---:|---:|---|---:|---:|")
single = None
for mode in ["single", "batch", "ndjson", "stream"]:
    rs = runs.get(mode)
    if not rs:
        continue
    mps = statistics.median(r["messages_per_s"] for r in rs)
    us = statistics.median(r["server_cpu_us_per_message"] or 0 for r in rs)
    if mode == "single":
        single = (mps, us)
    each = "; ".join(f"{r['messages_per_s']:,.0f}, {r['server_cpu_us_per_message'] or 0:.2f}" for r in rs)
    print(f"| {mode} | {rs[0]['batch']} | {mps:,.0f} | {us:.2f} | {each} | {sum(r['refused'] for r in rs)} | {sum(r['errors'] for r in rs)} |")
if single:
    for mode in ["batch", "ndjson", "stream"]:
        rs = runs.get(mode)
        if rs:
            mps = statistics.median(r["messages_per_s"] for r in rs)
            us = statistics.median(r["server_cpu_us_per_message"] or 0 for r in rs)
            print(f"\n- {mode}: {mps / single[0]:.1f}× the messages/s of single publishes at {single[1] / us:.1f}× less CPU per message.", end="")
    print()
EOF
echo "appended to bench/RESULTS.md; reports under $OUT"
