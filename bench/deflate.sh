#!/usr/bin/env bash
# Issue 17's bench: permessage-deflate on realistic danmaku (bench/danmaku_fixture.py: blocks of
# 20 — Chinese and English chat lines, gifts, a coalesced PK score, the odd notice), one room of
# MEMBERS members (`barrage-load hold --read`, counting frames and bytes on the wire), a block
# every 50 ms: barrage without and with the extension (every member offers it, as browsers do),
# with protobuf frames and with JSON frames,
# and uWebSockets.js (bench/peers/uwsjs) without and with its SHARED_COMPRESSOR, publishing each
# fixture block as one JSON message. MODES order is reversed every other of REPEAT rounds.
# Reports bytes on the wire per delivered message, frame deliveries/s, the server's CPU per
# delivery and per block, side by side. Appends a table to bench/RESULTS.md.
#
#   bench/deflate.sh
#   MEMBERS=2000 DURATION_S=5 REPEAT=1 bench/deflate.sh
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
MEMBERS="${MEMBERS:-10000}"
DURATION_S="${DURATION_S:-10}"
REPEAT="${REPEAT:-2}"
MODES="${MODES:-plain deflate json json-z uwsjs uwsjs-z}"
LEVEL="${LEVEL:-6}"
PORT="${PORT:-18840}"
API_PORT="${API_PORT:-9397}"
STAMP="$(date -u +%Y%m%dT%H%M%SZ)"
OUT="bench/out/deflate-$STAMP"
mkdir -p "$OUT"
cargo build --release --quiet --bin barrage --bin barrage-load
python3 bench/danmaku_fixture.py "$OUT/fixture" 400 20
if [[ " $MODES " == *" uwsjs"* && ! -d bench/peers/uwsjs/node_modules ]]; then (cd bench/peers/uwsjs && npm ci --silent); fi
ulimit -n 20000
gw="" holder="" pub=""
cleanup() { for p in $pub $holder $gw; do kill "$p" 2> /dev/null || true; done; wait 2> /dev/null || true; }
trap cleanup EXIT
n=0
for r in $(seq "$REPEAT"); do
  for mode in $(round_modes "$r" "$MODES"); do
    n=$((n + 1))
    client=() peer=()
    [[ $mode == deflate || $mode == json-z || $mode == uwsjs-z ]] && client=(--deflate)
    [[ $mode == json || $mode == json-z ]] && client+=(--json)
    case "$mode" in
      plain | deflate | json | json-z)
        extra=(--deflate false)
        [[ $mode == deflate || $mode == json-z ]] && extra=(--deflate true --deflate-level "$LEVEL")
        taskset -c 0,1 ./target/release/barrage --listen "127.0.0.1:$PORT" --api-listen "127.0.0.1:$API_PORT" \
          --block-interval-ms 50 --block-messages-max 1000 --pending-messages-max 100000 --room-rate-per-s 0 \
          --presence-events false --addr-conn-rate-per-s 0 --addr-request-rate-per-s 0 "${extra[@]}" > "$OUT/$mode-$r.gateway.log" 2>&1 &
        gw=$!
        await_barrage
        ;;
      uwsjs | uwsjs-z)
        comp=(); [[ $mode == uwsjs-z ]] && comp=(COMPRESSION=shared)
        env "${comp[@]}" taskset -c 0,1 node bench/peers/uwsjs/server.js "$PORT" > "$OUT/$mode-$r.gateway.log" 2>&1 &
        gw=$!
        await_line "peer on" "$OUT/$mode-$r.gateway.log"
        peer=(--path "/sub?room=r0" --no-welcome --publish-path "/pub?room=r0" --publish-every-ms 50 --publish-file "$OUT/fixture/peer.txt")
        ;;
    esac
    start_holder "$OUT/$mode-$r" "$((30 + n))" "${client[@]}" "${peer[@]}"
    barrage=1; [[ $mode == uwsjs* ]] && barrage=0
    if (( barrage )); then
      # The publisher: one fixture batch every 50 ms over one keep-alive connection.
      python3 - "$API_PORT" "$OUT/fixture/barrage.ndjson" $((DURATION_S + 2)) << 'PY' &
import http.client, sys, time
port, path, secs = int(sys.argv[1]), sys.argv[2], float(sys.argv[3])
lines = [l.encode() for l in open(path, encoding="utf-8") if l.strip()]
c = http.client.HTTPConnection("127.0.0.1", port)
end, i, nxt = time.time() + secs, 0, time.time()
while time.time() < end:
    c.request("POST", "/v1/publish", body=lines[i % len(lines)], headers={"Content-Type": "application/json"})
    c.getresponse().read()
    i += 1
    nxt += 0.05
    time.sleep(max(0, nxt - time.time()))
PY
      pub=$!
    fi
    sleep 1
    c0=$(cpu "$gw"); t0=$(date +%s.%N)
    (( barrage )) && { z0=$(metric barrage_deflate_frames_total); i0=$(metric barrage_deflate_bytes_total 'stage="in"'); o0=$(metric barrage_deflate_bytes_total 'stage="out"'); b0=$(metric barrage_blocks_total); }
    sleep "$DURATION_S"
    c1=$(cpu "$gw"); t1=$(date +%s.%N)
    z=0 zin=0 zout=0 blocks=0
    (( barrage )) && { z=$(( $(metric barrage_deflate_frames_total) - z0 )); zin=$(( $(metric barrage_deflate_bytes_total 'stage="in"') - i0 )); zout=$(( $(metric barrage_deflate_bytes_total 'stage="out"') - o0 )); blocks=$(( $(metric barrage_blocks_total) - b0 )); }
    [[ -n $pub ]] && { wait "$pub" 2> /dev/null || true; pub=""; }
    wait "$holder" 2> /dev/null || true; holder=""
    kill "$gw"; wait "$gw" 2> /dev/null || true; gw=""
    echo "{\"mode\":\"$mode\",\"run\":$r,\"t0\":$t0,\"t1\":$t1,\"cpu_ticks\":$((c1 - c0)),\"deflated\":$z,\"deflate_in\":$zin,\"deflate_out\":$zout,\"blocks\":$blocks,\"hold\":\"$OUT/$mode-$r.hold.json\"}" | tee -a "$OUT/runs.jsonl"
  done
done
python3 - "$OUT/runs.jsonl" "$STAMP" "MEMBERS=$MEMBERS DURATION_S=$DURATION_S REPEAT=$REPEAT MODES='$MODES' LEVEL=$LEVEL bench/deflate.sh" "$MEMBERS" >> bench/RESULTS.md << 'EOF'
import json, os, platform, statistics, sys
path, stamp, command, members = sys.argv[1:]
members = int(members)
hz = os.sysconf("SC_CLK_TCK")
runs = [json.loads(l) for l in open(path) if l.strip()]
model = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
PER_BLOCK = 20


def at(samples, t, key):
    for a, b in zip(samples, samples[1:]):
        if a["t"] <= t <= b["t"]:
            return a[key] + (b[key] - a[key]) * (t - a["t"]) / max(b["t"] - a["t"], 1e-9)
    return None


for r in runs:
    s = [x for x in (json.loads(l) for l in open(r["hold"]) if l.strip()) if "t" in x]
    got = {k: (at(s, r["t0"], k), at(s, r["t1"], k)) for k in ["frames", "read_bytes", "compressed"]}
    r["seconds"] = r["t1"] - r["t0"]
    for k, (a, b) in got.items():
        r[k] = (b - a) if a is not None and b is not None else 0

names = {"plain": "barrage", "deflate": "barrage + permessage-deflate", "json": "barrage, JSON frames", "json-z": "barrage, JSON frames + permessage-deflate", "uwsjs": "uWebSockets.js", "uwsjs-z": "uWebSockets.js + SHARED_COMPRESSOR"}
print(f"\n## {stamp} permessage-deflate on danmaku: bytes on the wire, deliveries and CPU, beside uWebSockets.js\n")
print(f"- Machine: {os.cpu_count()} cores ({model}), Linux {platform.release()}; server (barrage: 2 shards; uWebSockets.js: one thread), the members' client (`barrage-load hold --read`, epoll, counting frames and bytes; it offers permessage-deflate in the compressed modes and does not inflate) and the publisher on cores 0,1, loopback.")
print(f"- Command: `{command}`; fixture `bench/danmaku_fixture.py` (blocks of {PER_BLOCK}: 17 chat lines, 70% Chinese, 2 gifts, a PK score, the odd notice), one block every 50 ms to {members:,} members in one room — barrage: one `POST /v1/publish` batch per block (a block frame of protobuf `Message`s, a coalesced PK score); uWebSockets.js: the block as one JSON array, one message. Bytes per message = bytes read ÷ frames ÷ {PER_BLOCK}; CPU = the server's utime+stime over the window.\n")
print("| server | frame deliveries/s | compressed frames | bytes per frame | bytes per message | server µs per frame delivery | runs (deliveries/s, B/frame, µs) |")
print("|---|---:|---:|---:|---:|---:|---|")
med = {}
for mode in names:
    rs = [r for r in runs if r["mode"] == mode and r["frames"] > 0]
    if not rs:
        continue
    per = [(r["frames"] / r["seconds"], r["read_bytes"] / r["frames"], r["cpu_ticks"] / hz * 1e6 / r["frames"], r["compressed"] / r["frames"]) for r in rs]
    m = [statistics.median(x[i] for x in per) for i in range(4)]
    med[mode] = m
    each = "; ".join(f"{x[0]:,.0f}, {x[1]:,.0f}, {x[2]:.2f}" for x in per)
    print(f"| {names[mode]} | {m[0]:,.0f} | {m[3] * 100:.0f}% | {m[1]:,.0f} | {m[1] / PER_BLOCK:.1f} | {m[2]:.2f} | {each} |")
print()
for mode in ("deflate", "json-z"):
    z = [r for r in runs if r["mode"] == mode and r["deflated"] > 0]
    if z:
        ratio = statistics.median(r["deflate_out"] / r["deflate_in"] for r in z)
        print(f"- {names[mode]}: {statistics.median(r['deflated'] for r in z):,.0f} block frames compressed per run (one per block), to {ratio * 100:.0f}% of their size (`barrage_deflate_bytes_total`).")
if "plain" in med and "deflate" in med:
    p, d = med["plain"], med["deflate"]
    print(f"- barrage with permessage-deflate: {d[1] / p[1] * 100:.0f}% of the bytes per delivered message ({d[1] / PER_BLOCK:.1f} vs {p[1] / PER_BLOCK:.1f}), {d[2] / p[2]:.2f}× the CPU per delivery ({d[2] - p[2]:+.2f} µs: the compression, once per block, spread over {members:,} members, and fewer bytes to send).")
if "uwsjs" in med and "uwsjs-z" in med:
    p, d = med["uwsjs"], med["uwsjs-z"]
    print(f"- uWebSockets.js with SHARED_COMPRESSOR: {d[1] / p[1] * 100:.0f}% of its bytes per message ({d[1] / PER_BLOCK:.1f} vs {p[1] / PER_BLOCK:.1f}), {d[2] / p[2]:.2f}× its CPU per delivery.")
if "json" in med and "json-z" in med:
    p, d = med["json"], med["json-z"]
    print(f"- barrage's JSON frames with permessage-deflate: {d[1] / p[1] * 100:.0f}% of the bytes per message ({d[1] / PER_BLOCK:.1f} vs {p[1] / PER_BLOCK:.1f}), {d[2] / p[2]:.2f}× the CPU per delivery.")
if "json-z" in med and "uwsjs-z" in med:
    print(f"- JSON against JSON, compressed: barrage sends {med['json-z'][1] / med['uwsjs-z'][1]:.2f}× the bytes per message of uWebSockets.js (its frames carry seqs, ids and server times as well) at {med['json-z'][2] / med['uwsjs-z'][2]:.2f}× its CPU per delivery.")
if "deflate" in med and "uwsjs-z" in med:
    print(f"- Compressed, barrage sends {med['deflate'][1] / med['uwsjs-z'][1]:.2f}× the bytes per message of uWebSockets.js (protobuf blocks against JSON arrays) at {med['deflate'][2] / med['uwsjs-z'][2]:.2f}× its CPU per delivery.")
EOF
echo "appended to bench/RESULTS.md; reports under $OUT"
