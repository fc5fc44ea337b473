#!/usr/bin/env bash
# What readers that never read cost the kernel, old behaviour against new, side by side in one run:
# MEMBERS (10,000) members in one room at full fan-out, of which STALLED (1,000) subscribe and
# never read again (`barrage-load fanout --stalled`), holding their sockets open. For each gateway
# variant (one binary, two knobs), kernel TCP memory (/proc/net/sockstat), the gateway's own
# sockets (ss: queued send memory, orphans) and its RSS are sampled once a second before, during
# and after the slow-consumer closes; bench/stalled_report.py appends the table to
# bench/RESULTS.md.
#
#   bench/stalled.sh
#   VARIANTS="old new" DURATION_S=30 bench/stalled.sh
#
# Variants:
#   old    --send-buffer-bytes 0 --abortive-close false   (autotuned send buffers, FIN closes: the
#                                                          behaviour before these knobs)
#   cap    --abortive-close false                         (send buffer capped at the default only)
#   reset  --send-buffer-bytes 0                          (abortive close only)
#   new    the defaults (32 KiB send buffer, abortive close)
#
# Every member is sent every message: RATE (100) messages/s of MESSAGE_BYTES (1000), 100 KB/s per
# member, in blocks every BLOCK_INTERVAL_MS (200), so an autotuned send buffer (about 4 MiB on
# loopback) fills within the run (the old variant's slow-consumer closes come ≈ 40 s in), while
# the 9,000 readers keep up on two cores. The gateway is pinned to cores 0,1 with taskset; the
# load generator runs at nice 19 on the same cores. About 7 minutes for the four variants.
# Needs root (sysctls: tuning/apply.sh, restored on exit, as bench/million.sh). Loopback only;
# every run is bounded by the generator's --deadline-s and stops by itself.
set -euo pipefail
cd "$(dirname "$0")/.."

MEMBERS="${MEMBERS:-10000}"
STALLED="${STALLED:-1000}"
VARIANTS="${VARIANTS:-old new cap reset}"
RATE="${RATE:-100}"
MESSAGE_BYTES="${MESSAGE_BYTES:-1000}"
BLOCK_INTERVAL_MS="${BLOCK_INTERVAL_MS:-200}"
SLOW_CONSUMER_MS="${SLOW_CONSUMER_MS:-5000}"
DURATION_S="${DURATION_S:-60}"
WARMUP_S="${WARMUP_S:-2}"
# Everyone subscribed and nothing published yet: the "before" samples.
IDLE_S="${IDLE_S:-4}"
SHARDS="${SHARDS:-2}"
LOAD_THREADS="${LOAD_THREADS:-2}"
PORT_BASE="${PORT_BASE:-18700}"
API_BASE="${API_BASE:-19700}"
DEADLINE_S="${DEADLINE_S:-300}"

flags_of() {
  case "$1" in
    old) echo "--send-buffer-bytes 0 --abortive-close false" ;;
    cap) echo "--abortive-close false" ;;
    reset) echo "--send-buffer-bytes 0" ;;
    new) echo "" ;;
    *) echo "stalled.sh: unknown variant $1" >&2; exit 2 ;;
  esac
}
for v in $VARIANTS; do flags_of "$v" > /dev/null; done
if ((STALLED > MEMBERS - 1)); then
  echo "stalled.sh: STALLED must be below MEMBERS" >&2
  exit 2
fi

STAMP="$(date -u +%Y%m%dT%H%M%SZ)"
OUT="bench/out/stalled-$STAMP"
COMMAND="MEMBERS=$MEMBERS STALLED=$STALLED VARIANTS=\"$VARIANTS\" RATE=$RATE MESSAGE_BYTES=$MESSAGE_BYTES \
BLOCK_INTERVAL_MS=$BLOCK_INTERVAL_MS SLOW_CONSUMER_MS=$SLOW_CONSUMER_MS DURATION_S=$DURATION_S SHARDS=$SHARDS bench/stalled.sh"
mkdir -p "$OUT"

cargo build --release --quiet --bin barrage --bin barrage-load

server_pid=""
sampler_pid=""
stop_all() {
  if [[ -n "$sampler_pid" ]]; then
    kill "$sampler_pid" 2> /dev/null || true
    wait "$sampler_pid" 2> /dev/null || true
    sampler_pid=""
  fi
  if [[ -n "$server_pid" ]]; then
    kill -TERM "$server_pid" 2> /dev/null || true
    for _ in $(seq 100); do kill -0 "$server_pid" 2> /dev/null || break; sleep 0.1; done
    kill -KILL "$server_pid" 2> /dev/null || true
    wait "$server_pid" 2> /dev/null || true
    server_pid=""
  fi
}
cleanup() {
  stop_all
  STATE="bench/out/sysctl.saved" tuning/apply.sh --restore
}
trap cleanup EXIT
STATE="bench/out/sysctl.saved" tuning/apply.sh

variants_json=""
for v in $VARIANTS; do
  variants_json="$variants_json{\"name\": \"$v\", \"flags\": \"$(flags_of "$v")\"},"
done
cat > "$OUT/meta.json" << JSON
{"stamp": "$STAMP", "command": "${COMMAND//\"/\\\"}", "members": $MEMBERS, "stalled": $STALLED,
 "rate": $RATE, "message_bytes": $MESSAGE_BYTES, "block_interval_ms": $BLOCK_INTERVAL_MS,
 "slow_consumer_ms": $SLOW_CONSUMER_MS, "duration_s": $DURATION_S, "shards": $SHARDS,
 "variants": [${variants_json%,}]}
JSON

i=0
for v in $VARIANTS; do
  i=$((i + 1))
  port=$((PORT_BASE + i))
  api=$((API_BASE + i))
  dir="$OUT/$v"
  mkdir -p "$dir"
  # shellcheck disable=SC2046
  echo "== $v: $(flags_of "$v") (port $port)"
  # shellcheck disable=SC2046
  taskset -c 0,1 ./target/release/barrage --listen "127.0.0.1:$port" --api-listen "127.0.0.1:$api" \
    --shards "$SHARDS" --connections-max $((MEMBERS + 10000)) --block-interval-ms "$BLOCK_INTERVAL_MS" \
    --block-messages-max 1000 --pending-messages-max 100000 --room-rate-per-s 0 --data-bytes-max 65536 \
    --slow-consumer-ms "$SLOW_CONSUMER_MS" \
    --handshake-timeout-ms 120000 --heartbeat-ms 1800000 --idle-timeout-ms 3600000 \
    $(flags_of "$v") > "$dir/server.log" 2>&1 &
  server_pid=$!
  for _ in $(seq 300); do
    ss -Hltn "sport = :$port" | grep -q . && break
    sleep 0.1
  done
  python3 bench/stalled_report.py sample "$server_pid" "$port" "127.0.0.1:$api" "$dir/samples.tsv" &
  sampler_pid=$!
  sleep 3
  # A fresh source address range per variant: no TIME_WAIT pair from the last run is reused.
  status=0
  nice -n 19 ./target/release/barrage-load fanout --kind barrage --target "127.0.0.1:$port" \
    --api "127.0.0.1:$api" --members "$MEMBERS" --stalled "$STALLED" --rate "$RATE" \
    --message-bytes "$MESSAGE_BYTES" --idle-s "$IDLE_S" --duration-s "$DURATION_S" --warmup-s "$WARMUP_S" \
    --sources "127.0.$((10 + i)).1-127.0.$((10 + i)).4" --ports 10000-60999 --threads "$LOAD_THREADS" \
    --server-pid "$server_pid" --label "$v" --deadline-s "$DEADLINE_S" --json "$dir/load.json" \
    > "$dir/load.log" 2>&1 || status=$?
  touch "$dir/LOADGEN_DONE"
  sleep 4
  touch "$dir/STOP"
  wait "$sampler_pid" 2> /dev/null || true
  sampler_pid=""
  stop_all
  tail -4 "$dir/load.log" | sed 's/^/   /'
  echo "   load generator exit $status"
  sleep 2
done

python3 bench/stalled_report.py report "$OUT" | tee -a bench/RESULTS.md
echo "appended to bench/RESULTS.md; samples under $OUT"
