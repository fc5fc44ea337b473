#!/usr/bin/env bash
# What TLS costs per delivery: one room of MEMBERS members (`barrage-load hold --read`, reading
# and decrypting everything), blocks every 50 ms carrying the messages published meanwhile
# (BATCH messages of 100 bytes about twenty times a second through the batch API), over ws and
# over wss, alternated REPEAT times. Reports frame deliveries/s, bytes out/s, frames dropped and
# the gateway's CPU per frame delivered and per MB sent. Appends a table to bench/RESULTS.md.
#
#   bench/tls_fanout.sh
#   MEMBERS=5000 BATCH=10 DURATION_S=10 bench/tls_fanout.sh
set -euo pipefail
cd "$(dirname "$0")/.."
MEMBERS="${MEMBERS:-10000}"
BATCH="${BATCH:-5}"
DURATION_S="${DURATION_S:-10}"
REPEAT="${REPEAT:-2}"
PORT="${PORT:-18830}"
API_PORT="${API_PORT:-9395}"
STAMP="$(date -u +%Y%m%dT%H%M%SZ)"
OUT="bench/out/tls-fanout-$STAMP"
mkdir -p "$OUT"
cargo build --release --quiet --bin barrage --bin barrage-load
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout "$OUT/key.pem" -out "$OUT/cert.pem" \
  -days 2 -subj /CN=localhost -addext subjectAltName=DNS:localhost -addext basicConstraints=critical,CA:FALSE 2> /dev/null
ulimit -n 20000
gw="" holder=""
cleanup() { for p in $holder $gw; do kill "$p" 2> /dev/null || true; done; wait 2> /dev/null || true; }
trap cleanup EXIT
cpu() { awk '{print $14 + $15}' "/proc/$1/stat"; }
metric() { curl -s "http://127.0.0.1:$API_PORT/metrics" | awk -v n="$1" '$1 ~ "^"n"(\\{|$)" {s += $2} END {printf "%d", s}'; }
body=$(python3 -c "import json; print(json.dumps([{'room': 'r0', 'text': 'x' * 100} for _ in range($BATCH)]))")
n=0
for r in $(seq "$REPEAT"); do
  modes="plain tls"; (( r % 2 == 0 )) && modes="tls plain"
  for mode in $modes; do
    # A fresh source address per run: the last run's ports sit in TIME_WAIT.
    n=$((n + 1))
    extra=() ca=()
    [[ $mode == tls ]] && extra=(--tls-cert "$OUT/cert.pem" --tls-key "$OUT/key.pem") && ca=(--ca "$OUT/cert.pem")
    taskset -c 0,1 ./target/release/barrage --listen "127.0.0.1:$PORT" --api-listen "127.0.0.1:$API_PORT" \
      --block-interval-ms 50 --block-messages-max 1000 --pending-messages-max 100000 --room-rate-per-s 0 \
      --presence-events false --addr-conn-rate-per-s 0 --addr-request-rate-per-s 0 "${extra[@]}" > "$OUT/$mode-$r.gateway.log" 2>&1 &
    gw=$!
    for _ in $(seq 100); do curl -s -m 1 "http://127.0.0.1:$API_PORT/healthz" > /dev/null && break; sleep 0.05; done
    nice -n 10 taskset -c 0,1 ./target/release/barrage-load hold --ws "127.0.0.1:$PORT" --connections "$MEMBERS" --room r0 \
      --source "127.0.0.$((10 + n))" --read --hold-s $((DURATION_S + 4)) "${ca[@]}" > "$OUT/$mode-$r.hold.json" 2> "$OUT/$mode-$r.hold.err" &
    holder=$!
    for _ in $(seq 600); do [[ -s "$OUT/$mode-$r.hold.json" ]] || ! kill -0 "$holder" 2> /dev/null && break; sleep 0.2; done
    sleep 1
    c0=$(cpu "$gw"); d0=$(metric barrage_block_deliveries_total); b0=$(metric barrage_bytes_out_total); x0=$(metric barrage_frames_dropped_total)
    t0=$(date +%s.%N)
    end=$(( $(date +%s) + DURATION_S ))
    while (( $(date +%s) < end )); do
      curl -s -XPOST "http://127.0.0.1:$API_PORT/v1/publish" -d "$body" > /dev/null
      sleep 0.05
    done
    c1=$(cpu "$gw"); d1=$(metric barrage_block_deliveries_total); b1=$(metric barrage_bytes_out_total); x1=$(metric barrage_frames_dropped_total)
    t1=$(date +%s.%N)
    echo "{\"mode\":\"$mode\",\"run\":$r,\"seconds\":$(echo "$t1 - $t0" | bc),\"cpu_ticks\":$((c1 - c0)),\"deliveries\":$((d1 - d0)),\"bytes\":$((b1 - b0)),\"dropped\":$((x1 - x0))}" | tee -a "$OUT/runs.jsonl"
    wait "$holder" 2> /dev/null || true; holder=""
    kill "$gw"; wait "$gw" 2> /dev/null || true; gw=""
  done
done
python3 - "$OUT/runs.jsonl" "$STAMP" "MEMBERS=$MEMBERS BATCH=$BATCH DURATION_S=$DURATION_S REPEAT=$REPEAT bench/tls_fanout.sh" >> bench/RESULTS.md << 'EOF'
import json, os, platform, statistics, sys
path, stamp, command = sys.argv[1:]
hz = os.sysconf("SC_CLK_TCK")
runs = [json.loads(l) for l in open(path) if l.strip()]
model = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
print(f"\n## {stamp} fan-out over wss against ws: what TLS costs per delivery\n")
print(f"- Machine: {os.cpu_count()} cores ({model}), Linux {platform.release()}; gateway (2 shards), the members' client (`barrage-load hold --read`: epoll, rustls, decrypting everything) and the publisher on cores 0,1, loopback.")
print(f"- Command: `{command}`; one room, blocks every 50 ms; CPU = the gateway's utime+stime over the window.\n")
print("| listener | frame deliveries/s | MB/s out | frames dropped | gateway µs per frame delivery | gateway ms per MB | runs (deliveries/s, µs/frame) |")
print("|---|---:|---:|---:|---:|---:|---|")
med = {}
for mode in ["plain", "tls"]:
    rs = [r for r in runs if r["mode"] == mode and r["deliveries"] > 0]
    if not rs:
        continue
    per = [(r["deliveries"] / r["seconds"], r["cpu_ticks"] / hz * 1e6 / max(r["deliveries"], 1), r["bytes"] / r["seconds"] / 1e6, r["cpu_ticks"] / hz * 1e3 / max(r["bytes"] / 1e6, 1e-9), r["dropped"]) for r in rs]
    m = [statistics.median(x[i] for x in per) for i in range(4)]
    med[mode] = m
    each = "; ".join(f"{x[0]:,.0f}, {x[1]:.2f}" for x in per)
    print(f"| {'wss' if mode == 'tls' else 'ws'} | {m[0]:,.0f} | {m[2]:.1f} | {sum(x[4] for x in per)} | {m[1]:.2f} | {m[3]:.1f} | {each} |")
if "plain" in med and "tls" in med:
    print(f"\n- wss costs {med['tls'][1] / med['plain'][1]:.1f}× the gateway CPU per frame delivery of ws ({med['tls'][1] - med['plain'][1]:+.2f} µs: the per-member seal).")
EOF
echo "appended to bench/RESULTS.md; reports under $OUT"
