#!/usr/bin/env bash
# Issue 15's browser bench: messages/s one tab renders from the demo's room without dropping below
# 50 fps. Starts barrage (release) with the room limits lifted (1,000 messages a block, a 100 ms
# tick, no room rate) and runs sdk/js/bench/fps.js: headless Chromium on /demo/, chat lines
# published at RATES messages/s through the batch API, the page's frame times per second.
# Appends a table to bench/RESULTS.md. Gateway, browser and publisher share the box's cores.
#
#   bench/demo_fps.sh
#   RATES=100,400,1600 DURATION_S=8 bench/demo_fps.sh
set -euo pipefail
cd "$(dirname "$0")/.."
RATES="${RATES:-50,100,200,400,800,1600}"
SECONDS_PER_RATE="${DURATION_S:-6}"
PORT="${PORT:-18810}"
API_PORT="${API_PORT:-9392}"
STAMP="$(date -u +%Y%m%dT%H%M%SZ)"
OUT="bench/out/demo-fps-$STAMP"
mkdir -p "$OUT"
cargo build --release --quiet --bin barrage
(cd sdk/js && [[ -d node_modules ]] || npm ci --no-audit --no-fund --loglevel=error)
./target/release/barrage --listen "127.0.0.1:$PORT" --api-listen "127.0.0.1:$API_PORT" --block-interval-ms 100 \
  --block-messages-max 1000 --pending-messages-max 100000 --room-rate-per-s 0 --presence-events false \
  > "$OUT/gateway.log" 2>&1 &
gw=$!
trap 'kill $gw 2> /dev/null || true' EXIT
for _ in $(seq 100); do curl -s -m 1 "http://127.0.0.1:$API_PORT/healthz" > /dev/null && break; sleep 0.05; done
(cd sdk/js && node bench/fps.js "$PORT" "$API_PORT" "$RATES" "$SECONDS_PER_RATE") | tee "$OUT/fps.jsonl"
python3 - "$OUT/fps.jsonl" "$STAMP" "RATES=$RATES DURATION_S=$SECONDS_PER_RATE bench/demo_fps.sh" >> bench/RESULTS.md << 'EOF'
import json, os, platform, sys
path, stamp, command = sys.argv[1:]
rows = [json.loads(l) for l in open(path) if l.strip()]
model = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
print(f"\n## {stamp} demo page: messages/s one Chromium tab renders at 50 fps or more\n")
print(f"- Machine: {os.cpu_count()} cores ({model}), Linux {platform.release()}; barrage (release, 2 shards), headless Chromium (software rendering, 1280x720) and the publisher on the same cores.")
print(f"- Command: `{command}`; chat lines (Chinese and English) through `POST /v1/publish` ten times a second; the page flies each as a danmaku (skipping what would wait over 2 s for a lane) and logs it; frames from requestAnimationFrame, per whole second.\n")
print("| published/s | rendered/s (logged) | flown as danmaku/s | min fps | median fps | longest frame ms |")
print("|---:|---:|---:|---:|---:|---:|")
for r in rows:
    print(f"| {r['rate']} | {r['deliveredPerS']} | {r['danmakuPerS']} | {r['minFps']} | {r['medianFps']} | {r['longestFrameMs']} |")
ok = [r["rate"] for r in rows if r["minFps"] >= 50]
print(f"\n- Highest rate with every second at 50 fps or more: **{max(ok) if ok else 'none'} messages/s**.")
EOF
