#!/usr/bin/env bash
# What TLS costs per delivery: one room of MEMBERS members (`barrage-load hold --read`, reading,
# decrypting and counting everything), a frame to each about every 50 ms — barrage: blocks
# every 50 ms carrying the messages published meanwhile (BATCH messages of 100 bytes about
# twenty times a second through the batch API); uWebSockets.js (bench/peers/uwsjs, `SSLApp` on
# the same certificate for wss): a FRAME_BYTES message every 50 ms through its /pub — over ws
# and over wss, in MODES order reversed every other of REPEAT rounds. Reports frame deliveries/s
# counted by the members, MB/s, and the server's CPU per frame delivered and per MB. Appends a
# table to bench/RESULTS.md.
#
#   bench/tls_fanout.sh
#   MEMBERS=5000 BATCH=10 DURATION_S=10 bench/tls_fanout.sh
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
MEMBERS="${MEMBERS:-10000}"
BATCH="${BATCH:-5}"
DURATION_S="${DURATION_S:-10}"
REPEAT="${REPEAT:-2}"
MODES="${MODES:-plain tls uwsjs uwsjs-tls}"
# The peer's message size: about barrage's block frame of BATCH=5 messages of 100 bytes.
FRAME_BYTES="${FRAME_BYTES:-740}"
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
body=$(python3 -c "import json; print(json.dumps([{'room': 'r0', 'text': 'x' * 100} for _ in range($BATCH)]))")
if [[ " $MODES " == *" uwsjs"* && ! -d bench/peers/uwsjs/node_modules ]]; then (cd bench/peers/uwsjs && npm ci --silent); fi
n=0
for r in $(seq "$REPEAT"); do
  for mode in $(round_modes "$r" "$MODES"); do
    # A fresh source address per run: the last run's ports sit in TIME_WAIT.
    n=$((n + 1))
    extra=() ca=() peer=()
    [[ $mode == *tls ]] && ca=(--ca "$OUT/cert.pem")
    case "$mode" in
      plain | tls)
        [[ $mode == tls ]] && extra=(--tls-cert "$OUT/cert.pem" --tls-key "$OUT/key.pem")
        taskset -c 0,1 ./target/release/barrage --listen "127.0.0.1:$PORT" --api-listen "127.0.0.1:$API_PORT" \
          --block-interval-ms 50 --block-messages-max 1000 --pending-messages-max 100000 --room-rate-per-s 0 \
          --presence-events false --addr-conn-rate-per-s 0 --addr-request-rate-per-s 0 "${extra[@]}" > "$OUT/$mode-$r.gateway.log" 2>&1 &
        gw=$!
        await_barrage
        ;;
      uwsjs | uwsjs-tls)
        # uWebSockets.js (SSLApp with CERT/KEY) on the same certificate; the holder publishes
        # one FRAME_BYTES message every 50 ms through its /pub.
        [[ $mode == uwsjs-tls ]] && tlsenv=(CERT="$OUT/cert.pem" KEY="$OUT/key.pem") || tlsenv=()
        env "${tlsenv[@]}" taskset -c 0,1 node bench/peers/uwsjs/server.js "$PORT" > "$OUT/$mode-$r.gateway.log" 2>&1 &
        gw=$!
        await_line "peer on" "$OUT/$mode-$r.gateway.log"
        peer=(--path "/sub?room=r0" --no-welcome --publish-path "/pub?room=r0" --publish-every-ms 50 --publish-bytes "$FRAME_BYTES")
        ;;
    esac
    start_holder "$OUT/$mode-$r" "$((10 + n))" "${ca[@]}" "${peer[@]}"
    sleep 1
    barrage=0; [[ $mode == plain || $mode == tls ]] && barrage=1
    c0=$(cpu "$gw"); t0=$(date +%s.%N)
    (( barrage )) && { d0=$(metric barrage_block_deliveries_total); x0=$(metric barrage_frames_dropped_total); }
    end=$(( $(date +%s) + DURATION_S ))
    while (( $(date +%s) < end )); do
      (( barrage )) && curl -s -XPOST "http://127.0.0.1:$API_PORT/v1/publish" -d "$body" > /dev/null
      sleep 0.05
    done
    c1=$(cpu "$gw"); t1=$(date +%s.%N)
    d=0 x=0
    (( barrage )) && { d=$(( $(metric barrage_block_deliveries_total) - d0 )); x=$(( $(metric barrage_frames_dropped_total) - x0 )); }
    wait "$holder" 2> /dev/null || true; holder=""
    kill "$gw"; wait "$gw" 2> /dev/null || true; gw=""
    echo "{\"mode\":\"$mode\",\"run\":$r,\"t0\":$t0,\"t1\":$t1,\"cpu_ticks\":$((c1 - c0)),\"gateway_deliveries\":$d,\"dropped\":$x,\"hold\":\"$OUT/$mode-$r.hold.json\"}" | tee -a "$OUT/runs.jsonl"
  done
done
python3 - "$OUT/runs.jsonl" "$STAMP" "MEMBERS=$MEMBERS BATCH=$BATCH DURATION_S=$DURATION_S REPEAT=$REPEAT MODES='$MODES' bench/tls_fanout.sh" >> bench/RESULTS.md << 'EOF'
import json, os, platform, statistics, sys
path, stamp, command = sys.argv[1:]
hz = os.sysconf("SC_CLK_TCK")
runs = [json.loads(l) for l in open(path) if l.strip()]
model = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")


def at(samples, t, key):
    """A counter of the holder's progress lines at time t (linear between samples)."""
    for a, b in zip(samples, samples[1:]):
        if a["t"] <= t <= b["t"]:
            return a[key] + (b[key] - a[key]) * (t - a["t"]) / max(b["t"] - a["t"], 1e-9)
    return None


for r in runs:
    samples = [x for x in (json.loads(l) for l in open(r["hold"]) if l.strip()) if "t" in x]
    f0, f1 = at(samples, r["t0"], "frames"), at(samples, r["t1"], "frames")
    b0, b1 = at(samples, r["t0"], "read_bytes"), at(samples, r["t1"], "read_bytes")
    r["seconds"] = r["t1"] - r["t0"]
    r["frames"] = (f1 - f0) if f0 is not None and f1 is not None else 0
    r["bytes"] = (b1 - b0) if b0 is not None and b1 is not None else 0

names = {"plain": "barrage ws", "tls": "barrage wss", "uwsjs": "uWebSockets.js ws", "uwsjs-tls": "uWebSockets.js wss (SSLApp)"}
print(f"\n## {stamp} fan-out over wss against ws, beside uWebSockets.js: what TLS costs per delivery\n")
print(f"- Machine: {os.cpu_count()} cores ({model}), Linux {platform.release()}; server (barrage: 2 shards; uWebSockets.js: one thread), the members' client (`barrage-load hold --read`: epoll, rustls, decrypting and counting every frame) and the publisher on cores 0,1, loopback, one certificate (P-256).")
print(f"- Command: `{command}`; one room, a frame to every member about every 50 ms (barrage: blocks of the messages published meanwhile; uWebSockets.js: one message of the same size per 50 ms through its `/pub`); frames counted by the members; CPU = the server's utime+stime over the window.\n")
print("| server | frame deliveries/s (members) | MB/s read | bytes/frame | server µs per frame delivery | server ms per MB | runs (deliveries/s, µs/frame) |")
print("|---|---:|---:|---:|---:|---:|---|")
med = {}
for mode in names:
    rs = [r for r in runs if r["mode"] == mode and r["frames"] > 0]
    if not rs:
        continue
    per = [(r["frames"] / r["seconds"], r["cpu_ticks"] / hz * 1e6 / r["frames"], r["bytes"] / r["seconds"] / 1e6, r["cpu_ticks"] / hz * 1e3 / max(r["bytes"] / 1e6, 1e-9), r["bytes"] / r["frames"]) for r in rs]
    m = [statistics.median(x[i] for x in per) for i in range(5)]
    med[mode] = m
    each = "; ".join(f"{x[0]:,.0f}, {x[1]:.2f}" for x in per)
    print(f"| {names[mode]} | {m[0]:,.0f} | {m[2]:.1f} | {m[4]:.0f} | {m[1]:.2f} | {m[3]:.1f} | {each} |")
dropped = sum(r["dropped"] for r in runs)
print(f"\n- barrage frames dropped: {dropped}.")
if "plain" in med and "tls" in med:
    print(f"- barrage: wss costs {med['tls'][1] / med['plain'][1]:.1f}× the CPU per frame delivery of ws ({med['tls'][1] - med['plain'][1]:+.2f} µs: the per-member seal).")
if "uwsjs" in med and "uwsjs-tls" in med:
    print(f"- uWebSockets.js: wss costs {med['uwsjs-tls'][1] / med['uwsjs'][1]:.1f}× its CPU per frame delivery of ws ({med['uwsjs-tls'][1] - med['uwsjs'][1]:+.2f} µs).")
if "tls" in med and "uwsjs-tls" in med:
    print(f"- Over wss, barrage spends {med['tls'][1] / med['uwsjs-tls'][1]:.2f}× uWebSockets.js's CPU per frame delivery.")
EOF
echo "appended to bench/RESULTS.md; reports under $OUT"
