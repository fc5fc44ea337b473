#!/usr/bin/env bash
# The soak: hold CONNECTIONS (100,000) WebSocket connections against the release gateway for
# DURATION_S (an hour) while CHURN (1,000) of them a second — 1 % — close (a Close frame, then
# the server's answer) and reconnect into the same room (victims drawn at random, so a connection
# lives CONNECTIONS / CHURN = 100 s on average), and PUBLISH (ROOMS / 5: 200) messages a second
# are posted through the business API round ROOMS (1,000) rooms: one message per room every 5 s,
# 100 members a room, 20,000 deliveries a second. Why not one per room per second: on this 2-core
# box the churn alone keeps the gateway at about 1.3 cores (each close cancels its connection's
# requests by descriptor, which walks every armed poll of its ring: perf, 2026-12-04), so
# 100,000 deliveries a second on top saturated it (the generator's publisher and readers fell
# behind); 20,000 leave room. Every SAMPLE_S (10 s) the load generator writes a TSV row: the gateway's
# RSS, the kernel's TCP memory (/proc/net/sockstat: mem pages × 4096, inuse, orphan, tw; the TCP
# socket slabs), the gateway's /metrics (connections, rings, refusals, handshakes by result,
# closes by reason, ...) and its own counts (reconnect handshake failures among them).
# bench/soak_report.py then draws the plot and appends the figures, and whether the gateway's
# RSS and the kernel's TCP memory stayed flat within 2 % after warm-up, to bench/RESULTS.md.
#
#   bench/soak.sh                                              # the hour: 100,000 held, 1,000/s churn
#   DURATION_S=60 CONNECTIONS=20000 CHURN=200 ROOMS=200 PUBLISH=200 bench/soak.sh   # a check
#
# Flatness: over the soak phase (after the ramp), the mean of the rows in
# [start + WARMUP_S, start + WARMUP_S + WINDOW_S) against the mean of the rows in the last
# WINDOW_S; flat if the change is within 2 % of the first mean. WARMUP_S defaults to 300 s (the
# population has turned over three times, every room's history is full) and WINDOW_S to 600 s,
# both scaled down for short runs (a fifth, and a third of what is left).
#
# Needs root (sysctls: tuning/apply.sh, restored on exit, as bench/million.sh). Loopback only;
# bounded in count and time: the generator stops by itself (its --deadline-s), then the gateway.
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION_S="${DURATION_S:-3600}"
CONNECTIONS="${CONNECTIONS:-100000}"
CHURN="${CHURN:-1000}"
ROOMS="${ROOMS:-1000}"
PUBLISH="${PUBLISH:-$((ROOMS / 5))}"
MESSAGE_BYTES="${MESSAGE_BYTES:-100}"
RATE="${RATE:-5000}"
SAMPLE_S="${SAMPLE_S:-10}"
WARMUP_S="${WARMUP_S:-$((DURATION_S / 5 < 300 ? DURATION_S / 5 : 300))}"
REST_S=$((DURATION_S - WARMUP_S))
WINDOW_S="${WINDOW_S:-$((REST_S / 3 < 600 ? REST_S / 3 : 600))}"
THREADS="${THREADS:-2}"
PING_MS="${PING_MS:-0}"
CLOSE_WAIT_MS="${CLOSE_WAIT_MS:-10000}"
PORT="${PORT:-18960}"
API_PORT="${API_PORT:-19960}"
# Source addresses NET.1 .. NET.S, ports 10000-60999 each (51,000 per address): enough for the
# connections held, the pairs resting 61 s past TIME_WAIT after a close, and a quarter spare.
SOURCE_NET="${SOURCE_NET:-127.0.70}"
SOURCES="${SOURCES:-$(((CONNECTIONS + CHURN * 61 + 8192) * 5 / 4 / 51000 + 2))}"
STAMP="$(date -u +%Y%m%dT%H%M%SZ)"
OUT="bench/out/soak-$STAMP"
PLOT="bench/plots/soak-$CONNECTIONS-$STAMP.svg"
COMMAND="DURATION_S=$DURATION_S CONNECTIONS=$CONNECTIONS CHURN=$CHURN ROOMS=$ROOMS PUBLISH=$PUBLISH bench/soak.sh"
mkdir -p "$OUT" bench/plots

if ((WARMUP_S + 2 * WINDOW_S > DURATION_S || WINDOW_S < SAMPLE_S)); then
  echo "soak.sh: WARMUP_S + 2 × WINDOW_S must fit in DURATION_S, and a window hold a sample" >&2
  exit 2
fi

cargo build --release --quiet --bin barrage --bin barrage-load

gateway_pid=""
cleanup() {
  if [[ -n "$gateway_pid" ]]; then
    kill -TERM "$gateway_pid" 2> /dev/null || true
    for _ in $(seq 100); do kill -0 "$gateway_pid" 2> /dev/null || break; sleep 0.1; done
    kill -KILL "$gateway_pid" 2> /dev/null || true
    wait "$gateway_pid" 2> /dev/null || true
  fi
  STATE="$OUT/sysctl.saved" tuning/apply.sh --restore
}
trap cleanup EXIT
STATE="$OUT/sysctl.saved" tuning/apply.sh

# Idle timeouts longer than the run (the clients do not ping unless PING_MS is set), connection
# room above the count (closing sockets still count a moment), no per-address rates: a few source
# addresses open every connection. Everything else is the gateway's default.
IDLE_MS=$(((DURATION_S + 1800) * 1000))
GATEWAY_FLAGS="--connections-max $((CONNECTIONS + 20000)) --rooms-max $((ROOMS * 2)) \
--handshake-timeout-ms 120000 --heartbeat-ms $((IDLE_MS / 2)) --idle-timeout-ms $IDLE_MS \
--addr-conn-rate-per-s 0 --addr-request-rate-per-s 0"
# shellcheck disable=SC2086
./target/release/barrage --listen "127.0.0.1:$PORT" --api-listen "127.0.0.1:$API_PORT" $GATEWAY_FLAGS \
  > "$OUT/gateway.log" 2>&1 &
gateway_pid=$!
for _ in $(seq 100); do
  ss -Hltn "sport = :$API_PORT" | grep -q . && break
  sleep 0.1
done
head -3 "$OUT/gateway.log"

cat > "$OUT/meta.json" << JSON
{"stamp": "$STAMP", "command": "$COMMAND", "duration_s": $DURATION_S, "connections": $CONNECTIONS,
 "churn": $CHURN, "rooms": $ROOMS, "publish": $PUBLISH, "message_bytes": $MESSAGE_BYTES,
 "rate": $RATE, "sample_s": $SAMPLE_S, "warmup_s": $WARMUP_S, "window_s": $WINDOW_S,
 "threads": $THREADS, "ping_ms": $PING_MS, "sources": "$SOURCE_NET.1-$SOURCE_NET.$SOURCES",
 "gateway_flags": "$GATEWAY_FLAGS", "plot": "$PLOT"}
JSON

# nice 19: the gateway must not starve behind the generator on two cores.
status=0
nice -n 19 ./target/release/barrage-load soak \
  --target "127.0.0.1:$PORT" --api "127.0.0.1:$API_PORT" \
  --connections "$CONNECTIONS" --rooms "$ROOMS" --rate "$RATE" \
  --churn-per-s "$CHURN" --publish-per-s "$PUBLISH" --message-bytes "$MESSAGE_BYTES" \
  --duration-s "$DURATION_S" --sample-s "$SAMPLE_S" --ping-ms "$PING_MS" --close-wait-ms "$CLOSE_WAIT_MS" \
  --sources "$SOURCE_NET.1-$SOURCE_NET.$SOURCES" --ports 10000-60999 --threads "$THREADS" \
  --gateway-pid "$gateway_pid" --ss-port "$PORT" --tsv "$OUT/samples.tsv" --json "$OUT/load.json" || status=$?
echo "load generator exit $status"

python3 bench/soak_report.py "$OUT" "$status" >> bench/RESULTS.md
echo "appended to bench/RESULTS.md; plot $PLOT; samples $OUT/samples.tsv"
exit "$status"
