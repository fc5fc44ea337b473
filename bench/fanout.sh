#!/usr/bin/env bash
# One command for the fan-out comparison: for each room size M (10,000 and 100,000 members by
# default), run barrage, the floor (1, 8 and 32 frames per send) and every peer server
# (bench/peers/) back to back, in two modes each — `--rate` (latency at a fixed publish rate) and
# `--saturate` (throughput, closed loop with 32 messages in flight) and `deep` (the same with 256) —
# plus `frames` (send-bound: more frames demanded than the one-frame floor sends), all with the
# same load generator settings; then append a table of the absolute figures and of barrage's
# ratios to bench/RESULTS.md, with a plot under bench/plots/.
#
# Rates fit this 2-core box (shared with the generator): `rate` publishes 100,000 / M messages/s
# (≈100k deliveries/s, below every server's capacity, so latency is not queueing); `frames`
# publishes 400,000 / M (more than the one-frame floor can send). barrage's block interval: 20 ms
# for `rate` and `frames`; for `saturate`/`deep` M / 200 ms (at least 50), so a room's fan-out
# stays near 200k sends/s and blocks carry what arrived meanwhile — nothing is dropped or refused.
# Runs at 100k members last 2x DURATION_S: a round trip there takes seconds.
#
#   bench/fanout.sh
#   SIZES=10000 SERVERS="barrage floor uwsjs" MODES=saturate DURATION_S=5 bench/fanout.sh
#   ROOMS=10 SIZES=10000 MODES="rate saturate" bench/fanout.sh    # 10 rooms of 1,000 members
#   BASE_BIN=/tmp/barrage-before SERVERS="barrage barrage1 base base1" MODES="saturate deep" SIZES=10000 bench/fanout.sh
#     (`base` and `base1` run an earlier build of barrage with the same flags: a change's
#     before and after, side by side in one run)
#   ROOMS=1000 SIZES=10000 SERVERS="barrage barrage-redis" MODES=saturate bench/fanout.sh
#     (`barrage-redis` is barrage with --redis: durable state on a private redis-server started
#     per run on REDIS_PORT, pinned to the same cores, no persistence to disk; its commands/s and
#     CPU (INFO, sampled 4x a second) and barrage's redis counters go in a table of their own)
#
# Threads, matched across servers: every server is pinned to cores 0,1 (taskset) and gets
# THREADS (2) threads where it can use them — barrage shards, tokio workers, nginx workers —
# and runs single-threaded where that is its design: the floor, uWebSockets (socketify and
# uWebSockets.js: one event loop, topics are per loop) and Node ws. Nchan gets one nginx worker
# per 15,000 members when that is more (each worker is a process under the 20,000-fd cap). The
# load generator runs at nice 19 on the same two cores, so the server is never starved by it
# (but a two-thread server can starve the generator: `barrage1` is barrage with one shard, the
# thread count of the floor and of uWebSockets, for a like-for-like row).
# Peers that hold one fd per connection in one process (all but barrage, the floor and Nchan)
# are run only for M <= 19,000 and reported as n/a above it.
#
# LOADGEN overrides the generator binary (default ./target/release/barrage-load).
# Needs root (sysctls: tuning/apply.sh, restored on exit, as bench/million.sh). Loopback only;
# every run is bounded by the generator's --deadline-s and stops by itself.
set -euo pipefail
cd "$(dirname "$0")/.."

SIZES="${SIZES:-10000 100000}"
SERVERS="${SERVERS:-barrage barrage1 floor floor8 floor32 uwsjs uws tungstenite fastwebsockets nchan ws}"
MODES="${MODES:-rate saturate deep frames}"
RATE="${RATE:-}"
# Saturate windows (messages in flight per room): 32 is uWebSockets' best case (it packs up to
# 32 queued messages per write); `deep` keeps 256 in flight, where one-frame writers fall back.
WINDOW="${WINDOW:-32}"
DEEP_WINDOW="${DEEP_WINDOW:-256}"
DURATION_S="${DURATION_S:-10}"
WARMUP_S="${WARMUP_S:-2}"
MESSAGE_BYTES="${MESSAGE_BYTES:-100}"
# The variant: ROOMS rooms of M / ROOMS members each (member i in room i % ROOMS).
ROOMS="${ROOMS:-1}"
PUBLISHERS="${PUBLISHERS:-2}"
THREADS="${THREADS:-2}"
LOAD_THREADS="${LOAD_THREADS:-2}"
PORT_BASE="${PORT_BASE:-18500}"
API_PORT="${API_PORT:-9190}"
REDIS_PORT="${REDIS_PORT:-16390}"
DEADLINE_S="${DEADLINE_S:-600}"
LOADGEN="${LOADGEN:-./target/release/barrage-load}"
# An earlier barrage binary for the `base` and `base1` rows.
BASE_BIN="${BASE_BIN:-}"
# barrage's blocks: nothing dropped or refused, so every message reaches every member.
BLOCK_INTERVAL_MS="${BLOCK_INTERVAL_MS:-}"
BARRAGE_FLAGS=(--block-messages-max 1000 --pending-messages-max 100000 --room-rate-per-s 0 --send-queue-frames-max 64)
# The load generator's few source addresses each open thousands of connections: the per-address
# edge rates (issue 10) are off for the bench (also for BASE_BIN builds that have the flags).
EDGE_FLAGS=(--addr-conn-rate-per-s 0 --addr-request-rate-per-s 0)
# Publish rate (msgs/s) of a mode at M members (see above); RATE overrides.
rate_for() {
  if [[ -n $RATE ]]; then echo "$RATE"; return; fi
  case "$1" in
    frames) python3 -c "print(round(400000 * $ROOMS / $2, 3))" ;;
    *) python3 -c "print(round(100000 * $ROOMS / $2, 3))" ;;
  esac
}
# barrage's block interval (ms) for a mode at M members; BLOCK_INTERVAL_MS overrides.
block_ms_for() {
  if [[ -n $BLOCK_INTERVAL_MS ]]; then echo "$BLOCK_INTERVAL_MS"; return; fi
  case "$1" in
    saturate | deep) echo $(( $2 / 200 > 50 ? $2 / 200 : 50 )) ;;
    *) echo 20 ;;
  esac
}
FD_CAPPED="uws uwsjs ws tungstenite fastwebsockets"
FD_CAP_MEMBERS=19000

STAMP="$(date -u +%Y%m%dT%H%M%SZ)"
OUT="bench/out/fanout-$STAMP"
PLOT="bench/plots/fanout-$STAMP.svg"
ROOMS_NOTE=""
if [[ $ROOMS != 1 ]]; then ROOMS_NOTE=" ROOMS=$ROOMS"; fi
COMMAND="SIZES=\"$SIZES\" SERVERS=\"$SERVERS\" MODES=\"$MODES\"${RATE:+ RATE=$RATE} WINDOW=$WINDOW DEEP_WINDOW=$DEEP_WINDOW \
DURATION_S=$DURATION_S WARMUP_S=$WARMUP_S MESSAGE_BYTES=$MESSAGE_BYTES PUBLISHERS=$PUBLISHERS \
THREADS=$THREADS LOAD_THREADS=$LOAD_THREADS${ROOMS_NOTE}${PAGE_REPORTING_ORDER:+ PAGE_REPORTING_ORDER=$PAGE_REPORTING_ORDER}${BASE_BIN:+ BASE_BIN=$BASE_BIN} bench/fanout.sh"
mkdir -p "$OUT/runs" bench/plots

cargo build --release --quiet --bin barrage --bin barrage-floor --bin barrage-load
if [[ " $SERVERS " == *" base"* && ! -x $BASE_BIN ]]; then
  echo "fanout.sh: the base rows need BASE_BIN, an earlier barrage binary" >&2
  exit 2
fi
if ! "$LOADGEN" fanout --help > /dev/null 2>&1; then
  echo "fanout.sh: $LOADGEN has no 'fanout' scenario yet (bench/loadgen/)" >&2
  exit 2
fi
bench/peers/install.sh > "$OUT/install.log" 2>&1 || { tail -3 "$OUT/install.log" >&2; exit 1; }
if [[ " $SERVERS " == *"-redis "* ]] && ! command -v redis-server > /dev/null; then
  { apt-get update -q && apt-get install -y -q redis-server; } >> "$OUT/install.log" 2>&1 \
    || { echo "fanout.sh: could not install redis-server" >&2; exit 1; }
fi

# A base build from before issue 10 has no edge-rate flags; a later one gets them like barrage.
base_has_edge=0
if [[ -n $BASE_BIN ]] && "$BASE_BIN" --help 2>&1 | grep -q -- --addr-conn-rate-per-s; then base_has_edge=1; fi
server_pid=""
sampler_pid=""
redis_pid=""
redis_dir=""
redis_sampler_pid=""
stop_redis() {
  for pid in $redis_sampler_pid $redis_pid; do
    kill "$pid" 2> /dev/null || true
    wait "$pid" 2> /dev/null || true
  done
  redis_sampler_pid=""
  redis_pid=""
  [[ -n $redis_dir ]] && rm -rf "$redis_dir"
  redis_dir=""
}
stop_server() {
  if [[ -n "$sampler_pid" ]]; then
    kill "$sampler_pid" 2> /dev/null || true
    wait "$sampler_pid" 2> /dev/null || true
    sampler_pid=""
  fi
  if [[ -z "$server_pid" ]]; then
    return 0
  fi
  kill -TERM "$server_pid" 2> /dev/null || true
  for _ in $(seq 100); do kill -0 "$server_pid" 2> /dev/null || break; sleep 0.1; done
  kill -KILL "$server_pid" 2> /dev/null || true
  wait "$server_pid" 2> /dev/null || true
  server_pid=""
  stop_redis
}
# Guests with free page reporting (virtio-balloon) hand freed pages back to the host; when a
# slow reader makes TCP buffers churn through gigabytes, every page touched again costs a host
# fault and kernel copies slow down several-fold. PAGE_REPORTING_ORDER raises the smallest
# reported block for the run (restored on exit); bare metal has no such parameter.
reporting=/sys/module/page_reporting/parameters/page_reporting_order
reporting_was=""
cleanup() {
  stop_server
  STATE="bench/out/sysctl.saved" tuning/apply.sh --restore
  if [[ -n $reporting_was ]]; then
    echo "$reporting_was" > "$reporting" && echo "restored page_reporting_order = $reporting_was"
  fi
}
trap cleanup EXIT
STATE="bench/out/sysctl.saved" tuning/apply.sh
if [[ -n ${PAGE_REPORTING_ORDER:-} && -w $reporting ]]; then
  reporting_was="$(cat "$reporting")"
  echo "$PAGE_REPORTING_ORDER" > "$reporting"
  echo "set page_reporting_order = $PAGE_REPORTING_ORDER (was $reporting_was)"
fi

threads_of() {
  case "$1" in
    barrage | barrage-redis | base | tungstenite | fastwebsockets | nchan) echo "$THREADS" ;;
    barrage1 | base1) echo 1 ;;
    *) echo 1 ;;
  esac
}
kind_of() {
  case "$1" in
    barrage | barrage1 | barrage-redis | base | base1) echo barrage ;;
    nchan) echo nchan ;;
    *) echo broadcast ;;
  esac
}

# What each server ran with, for the report and for this output.
plan=""
for members in $SIZES; do
  for mode in $MODES; do
    plan="$plan $members:$mode:$(rate_for "$mode" "$members"):$(block_ms_for "$mode" "$members")"
  done
done
python3 - "$OUT/meta.json" "$STAMP" "$COMMAND" "$SIZES" "$SERVERS" "$MODES" "$THREADS" "$plan" \
  "$DURATION_S" "${BARRAGE_FLAGS[*]}" "$ROOMS" "$BASE_BIN" << 'EOF'
import json, sys
out, stamp, command, sizes, servers, modes, threads, plan, duration, flags, rooms, base = sys.argv[1:]
plan = {f"{m}-{mode}": {"rate": float(r), "block_interval_ms": int(b)}
        for m, mode, r, b in (p.split(":") for p in plan.split())}
t = int(threads)
how = {
    "barrage": f"{t} shards, {flags}, block interval per mode (below)",
    "barrage1": "1 shard, otherwise as barrage (thread-matched with the floor and uWebSockets)",
    "barrage-redis": "as barrage, with --redis: durable state on a private redis-server 7 (one thread, "
                     "pinned to the same cores, no RDB/AOF persistence) started for the run",
    "base": f"an earlier build ({base}), otherwise as barrage", "base1": f"an earlier build ({base}), as barrage1",
    "floor": "1 thread, 1 frame per send", "floor8": "1 thread, up to 8 frames per sendmsg",
    "floor32": "1 thread, up to 32 frames per sendmsg",
    "uwsjs": "1 thread (uWebSockets.js: one event loop)", "uws": "1 thread (socketify: one event loop)",
    "ws": "1 thread (Node event loop)", "tungstenite": f"{t} tokio worker threads",
    "fastwebsockets": f"{t} tokio worker threads",
    "nchan": f"max({t}, members / 15,000) nginx worker processes",
}
json.dump({"stamp": stamp, "command": command, "sizes": [int(s) for s in sizes.split()],
           "servers": [{"name": s, "runs_with": how.get(s, "?")} for s in servers.split()],
           "modes": modes.split(), "threads": t, "plan": plan, "rooms": int(rooms),
           "duration_s": float(duration), "pinning": "taskset -c 0,1 (server); load generator nice 19, same cores"},
          open(out, "w"), indent=1)
for s in servers.split():
    print(f"  {s:15} {how.get(s, '?')}")
EOF

run=0
for members in $SIZES; do
  sources=$((members / 51000 + 2))
  for mode in $MODES; do
    for name in $SERVERS; do
      run=$((run + 1))
      port=$((PORT_BASE + run))
      tag="$members-$mode-$name"
      json="$OUT/runs/$tag.json"
      if [[ " $FD_CAPPED " == *" $name "* ]] && ((members > FD_CAP_MEMBERS)); then
        echo "== $tag: n/a (one fd per connection, RLIMIT_NOFILE 20,000)"
        printf '{"label": "%s", "members": %d, "mode": "%s", "na": "RLIMIT_NOFILE 20,000"}\n' \
          "$name" "$members" "$mode" > "$json"
        continue
      fi
      threads=$(threads_of "$name")
      kind=$(kind_of "$name")
      how="$threads thread(s)"
      [[ $name == nchan ]] && how="$(( (members + 14999) / 15000 > threads ? (members + 14999) / 15000 : threads )) nginx workers"
      echo "== $tag: $how, pinned to cores 0,1, port $port"
      redis_flags=()
      if [[ $name == *-redis ]]; then
        redis_dir="$(mktemp -d)"
        taskset -c 0,1 redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no \
          --dir "$redis_dir" > "$OUT/runs/$tag.redis.log" 2>&1 &
        redis_pid=$!
        for _ in $(seq 100); do redis-cli -p "$REDIS_PORT" ping > /dev/null 2>&1 && break; sleep 0.1; done
        nice -n 19 python3 bench/fanout_report.py --sample-redis "$REDIS_PORT" "$OUT/runs/$tag.redis.tsv" &
        redis_sampler_pid=$!
        redis_flags=(--redis "redis://127.0.0.1:$REDIS_PORT")
      fi
      if [[ $kind == barrage ]]; then
        bin=./target/release/barrage
        [[ $name == base* ]] && bin="$BASE_BIN"
        taskset -c 0,1 "$bin" --listen "127.0.0.1:$port" --api-listen "127.0.0.1:$API_PORT" \
          --shards "$threads" --connections-max $((members + 10000)) "${BARRAGE_FLAGS[@]}" \
          $([[ $name == base* && $base_has_edge == 0 ]] || echo "${EDGE_FLAGS[@]}") ${redis_flags[@]+"${redis_flags[@]}"} \
          --block-interval-ms "$(block_ms_for "$mode" "$members")" \
          --handshake-timeout-ms 120000 --heartbeat-ms 1800000 --idle-timeout-ms 3600000 \
          > "$OUT/runs/$tag.server.log" 2>&1 &
      else
        taskset -c 0,1 bench/peers/run.sh "$name" "$port" "$threads" "$members" > "$OUT/runs/$tag.server.log" 2>&1 &
      fi
      server_pid=$!
      for _ in $(seq 300); do
        ss -Hltn "sport = :$port" | grep -q . && break
        kill -0 "$server_pid" 2> /dev/null || break
        sleep 0.1
      done
      if ! ss -Hltn "sport = :$port" | grep -q .; then
        echo "   server did not listen; see $OUT/runs/$tag.server.log"
        printf '{"label": "%s", "members": %d, "mode": "%s", "failed": "server did not start"}\n' \
          "$name" "$members" "$mode" > "$json"
        stop_server
        continue
      fi
      # The server's whole process tree (Nchan's workers are children): CPU sampled 4 times a second.
      nice -n 19 python3 bench/fanout_report.py --sample-cpu "$server_pid" "$OUT/runs/$tag.cpu.tsv" &
      sampler_pid=$!
      args=(fanout --target "127.0.0.1:$port" --kind "$kind" --members "$members" --rooms "$ROOMS"
        --duration-s "$(( members >= 100000 ? 2 * DURATION_S : DURATION_S ))" --warmup-s "$WARMUP_S" --json "$json" --server-pid "$server_pid"
        --message-bytes "$MESSAGE_BYTES" --publishers "$PUBLISHERS" --sources "127.0.1.1-127.0.1.$sources"
        --ports 10000-60999 --threads "$LOAD_THREADS" --label "$name" --deadline-s "$DEADLINE_S")
      [[ $kind == barrage ]] && args+=(--api "127.0.0.1:$API_PORT")
      if [[ $mode == saturate ]]; then
        args+=(--saturate --window "$WINDOW")
      elif [[ $mode == deep ]]; then
        args+=(--saturate --window "$DEEP_WINDOW")
      else
        args+=(--rate "$(rate_for "$mode" "$members")")
      fi
      status=0
      nice -n 19 "$LOADGEN" "${args[@]}" > "$OUT/runs/$tag.load.log" 2>&1 || status=$?
      # barrage's own counters at the end of the run (Redis writes, overflows, errors, ...).
      [[ $kind == barrage ]] && { curl -s -m 5 "http://127.0.0.1:$API_PORT/metrics" > "$OUT/runs/$tag.metrics.txt" || true; }
      stop_server
      if [[ ! -s $json ]]; then
        printf '{"label": "%s", "members": %d, "mode": "%s", "failed": "load generator exit %d, no report"}\n' \
          "$name" "$members" "$mode" "$status" > "$json"
      fi
      python3 - "$json" "$status" << 'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
if "delivered_per_s" in r:
    lat = r.get("latency_ns") or {}
    print(f"   exit {sys.argv[2]}: {r['delivered_per_s']:,.0f} deliveries/s, {r.get('frames_per_s', 0):,.0f} frames/s, "
          f"p99 {lat.get('p99', 0) / 1e6:.1f} ms, CPU {r.get('cpu_s_per_million_deliveries') or 0:.2f} s/1M, lost {r.get('lost', 0):,}")
else:
    print(f"   {r.get('failed', r.get('na'))}")
EOF
    done
  done
done

python3 bench/fanout_report.py "$OUT" --plot "$PLOT" >> bench/RESULTS.md
echo "appended to bench/RESULTS.md; plot $PLOT; reports under $OUT"
