#!/usr/bin/env bash
# Cluster fan-out, side by side in one run (issue 13): MEMBERS members spread evenly over the
# nodes of a cluster on this box (member i on node i mod N), in one room and in 100 rooms,
# publishing through the first node; for barrage with three nodes sharing rooms through one
# private Redis, against barrage as one node alone, and against what users would otherwise
# deploy for the job, each on three processes sharing rooms through the same kind of Redis:
# Socket.IO with @socket.io/redis-adapter and soketi (Pusher protocol, uWebSockets.js) with its
# Redis adapter (bench/peers/socketio, bench/peers/soketi). Two modes: `rate` (a fixed publish
# rate well below every server's capacity: latency from publish to each member and to the
# room's last member, across nodes) and `saturate` (closed loop, WINDOW messages in flight per
# room: deliveries/s). CPU per delivery is the whole cluster's: every node plus Redis (they are
# all children of one launcher whose process tree the load generator reads over the window).
#
#   bench/cluster.sh
#   SERVERS="barrage-1 barrage-3" ROOMS_LIST=1 MODES=saturate DURATION_S=5 bench/cluster.sh
#
# Servers: barrage-1 (one node, 2 shards, no Redis), barrage-3 (three nodes, 1 shard each, on
# Redis), socketio-1 / socketio-3 and soketi-1 / soketi-3 (one process; three processes on Redis).
# Everything is pinned to cores 0,1 with the load generator (nice 19); 2 cores for 3 nodes, Redis
# and the generator is the point: the cost of the cluster hop is measured, not hidden by spare
# cores. Needs root (sysctls via tuning/apply.sh, restored on exit). Loopback only; every run
# is bounded by the generator's --deadline-s.
set -euo pipefail
cd "$(dirname "$0")/.."

MEMBERS="${MEMBERS:-10000}"
ROOMS_LIST="${ROOMS_LIST:-1 100}"
SERVERS="${SERVERS:-barrage-1 barrage-3 socketio-1 socketio-3 soketi-1 soketi-3}"
MODES="${MODES:-rate saturate}"
WINDOW="${WINDOW:-32}"
DURATION_S="${DURATION_S:-10}"
WARMUP_S="${WARMUP_S:-2}"
MESSAGE_BYTES="${MESSAGE_BYTES:-100}"
# `rate`: deliveries/s aimed at, all rooms together (msgs/s = RATE_DELIVERIES / members).
RATE_DELIVERIES="${RATE_DELIVERIES:-50000}"
PUBLISHERS="${PUBLISHERS:-2}"
LOAD_THREADS="${LOAD_THREADS:-2}"
PORT_BASE="${PORT_BASE:-18600}"
API_BASE="${API_BASE:-9290}"
REDIS_PORT="${REDIS_PORT:-16391}"
DEADLINE_S="${DEADLINE_S:-300}"
LOADGEN="${LOADGEN:-./target/release/barrage-load}"
BARRAGE_FLAGS=(--block-messages-max 1000 --pending-messages-max 100000 --room-rate-per-s 0 --send-queue-frames-max 64
  --addr-conn-rate-per-s 0 --addr-request-rate-per-s 0 --handshake-timeout-ms 120000 --heartbeat-ms 1800000
  --idle-timeout-ms 3600000 --presence-events false)

STAMP="$(date -u +%Y%m%dT%H%M%SZ)"
OUT="bench/out/cluster-$STAMP"
COMMAND="MEMBERS=$MEMBERS ROOMS_LIST=\"$ROOMS_LIST\" SERVERS=\"$SERVERS\" MODES=\"$MODES\" WINDOW=$WINDOW \
DURATION_S=$DURATION_S WARMUP_S=$WARMUP_S MESSAGE_BYTES=$MESSAGE_BYTES RATE_DELIVERIES=$RATE_DELIVERIES \
PUBLISHERS=$PUBLISHERS LOAD_THREADS=$LOAD_THREADS bench/cluster.sh"
mkdir -p "$OUT/runs"

cargo build --release --quiet --bin barrage --bin barrage-load
bench/peers/install.sh > "$OUT/install.log" 2>&1 || { tail -3 "$OUT/install.log" >&2; exit 1; }
if ! command -v redis-server > /dev/null; then
  { apt-get update -q && apt-get install -y -q redis-server; } >> "$OUT/install.log" 2>&1 \
    || { echo "cluster.sh: could not install redis-server" >&2; exit 1; }
fi

launcher=""
redis_dir=""
stop_all() {
  if [[ -n $launcher ]]; then
    pkill -TERM -P "$launcher" 2> /dev/null || true
    for _ in $(seq 100); do pgrep -P "$launcher" > /dev/null || break; sleep 0.1; done
    pkill -KILL -P "$launcher" 2> /dev/null || true
    kill "$launcher" 2> /dev/null || true
    wait "$launcher" 2> /dev/null || true
    launcher=""
  fi
  [[ -n $redis_dir ]] && rm -rf "$redis_dir"
  redis_dir=""
}
cleanup() {
  stop_all
  STATE="bench/out/sysctl.saved" tuning/apply.sh --restore
}
trap cleanup EXIT
STATE="bench/out/sysctl.saved" tuning/apply.sh

# One server process of `name`, node `i` of a cluster of `nodes`, in the foreground.
node_cmd() {
  local name=$1 i=$2 nodes=$3 rooms=$4 port=$((PORT_BASE + $2)) api=$((API_BASE + $2))
  local redis="redis://127.0.0.1:$REDIS_PORT"
  case "$name" in
    barrage)
      local cluster=()
      ((nodes > 1)) && cluster=(--redis "$redis" --cluster true --cluster-node-id "n$i" --cluster-heartbeat-ms 500 --shards 1)
      ((nodes == 1)) && cluster=(--shards 2)
      echo ./target/release/barrage --listen "127.0.0.1:$port" --api-listen "127.0.0.1:$api" \
        --connections-max $((MEMBERS + 10000)) "${BARRAGE_FLAGS[@]}" --block-interval-ms 20 "${cluster[@]}"
      ;;
    socketio)
      local env="PORT=$port"
      ((nodes > 1)) && env="$env REDIS_URL=$redis"
      ((nodes == 1)) && env="$env NO_REDIS=1"
      echo env "$env" node bench/peers/socketio/server.js
      ;;
    soketi)
      local env="SOKETI_PORT=$port SOKETI_METRICS_SERVER_PORT=$((api + 100)) SOKETI_DEFAULT_APP_ID=barrage \
SOKETI_DEFAULT_APP_KEY=barrage-key SOKETI_DEFAULT_APP_SECRET=barrage-secret SOKETI_DEFAULT_APP_MAX_CONNECTIONS=-1 \
SOKETI_DEFAULT_APP_MAX_BACKEND_EVENTS_PER_SEC=-1 SOKETI_DEFAULT_APP_MAX_CLIENT_EVENTS_PER_SEC=-1 \
SOKETI_DEFAULT_APP_MAX_READ_REQ_PER_SEC=-1 SOKETI_METRICS_ENABLED=false"
      ((nodes > 1)) && env="$env SOKETI_ADAPTER_DRIVER=redis SOKETI_DB_REDIS_HOST=127.0.0.1 SOKETI_DB_REDIS_PORT=$REDIS_PORT"
      echo env $env bench/peers/soketi/node_modules/.bin/soketi start
      ;;
  esac
}

kind_of() {
  case "$1" in
    barrage) echo barrage ;;
    socketio) echo socket-io ;;
    soketi) echo pusher ;;
  esac
}

run=0
for rooms in $ROOMS_LIST; do
  for mode in $MODES; do
    for server in $SERVERS; do
      run=$((run + 1))
      name=${server%-*}
      nodes=${server##*-}
      tag="$rooms-$mode-$server"
      json="$OUT/runs/$tag.json"
      echo "== $tag: $nodes process(es), $rooms room(s), pinned to cores 0,1"
      # The launcher's children are the whole cluster: Redis and every node.
      script=""
      if ((nodes > 1)); then
        redis_dir="$(mktemp -d)"
        script+="redis-server --port $REDIS_PORT --bind 127.0.0.1 --save '' --appendonly no --dir $redis_dir > $OUT/runs/$tag.redis.log 2>&1 & "
        script+="for _ in \$(seq 100); do redis-cli -p $REDIS_PORT ping > /dev/null 2>&1 && break; sleep 0.1; done; "
      fi
      for ((i = 0; i < nodes; i++)); do
        script+="$(node_cmd "$name" "$i" "$nodes" "$rooms") > $OUT/runs/$tag.node$i.log 2>&1 & "
      done
      script+="wait"
      taskset -c 0,1 bash -c "$script" &
      launcher=$!
      targets=""
      for ((i = 0; i < nodes; i++)); do
        port=$((PORT_BASE + i))
        for _ in $(seq 300); do ss -Hltn "sport = :$port" | grep -q . && break; sleep 0.1; done
        targets+="${targets:+,}127.0.0.1:$port"
      done
      if [[ $name == barrage && $nodes -gt 1 ]]; then
        for _ in $(seq 100); do
          n=$(curl -s -m 2 "http://127.0.0.1:$API_BASE/v1/cluster" | python3 -c 'import json,sys; print(len(json.load(sys.stdin)["nodes"]))' 2> /dev/null || echo 0)
          ((n == nodes)) && break
          sleep 0.2
        done
      fi
      sleep 1
      rate=$(python3 -c "print(round($RATE_DELIVERIES / $MEMBERS * $rooms, 3))")
      args=(fanout --target "$targets" --kind "$(kind_of "$name")" --members "$MEMBERS" --rooms "$rooms"
        --duration-s "$DURATION_S" --warmup-s "$WARMUP_S" --json "$json" --server-pid "$launcher"
        --message-bytes "$MESSAGE_BYTES" --publishers "$PUBLISHERS" --sources 127.0.1.1-127.0.1.4
        --ports 10000-60999 --threads "$LOAD_THREADS" --label "$server" --deadline-s "$DEADLINE_S"
        --connect-rate 5000)
      [[ $name == barrage ]] && args+=(--api "127.0.0.1:$API_BASE")
      if [[ $mode == saturate ]]; then
        args+=(--saturate --window "$WINDOW")
      else
        args+=(--rate "$rate")
      fi
      redis_cpu_before=0
      if ((nodes > 1)); then
        redis_cpu_before=$(redis-cli -p "$REDIS_PORT" info cpu | awk -F: '/used_cpu_(sys|user):/ {s += $2} END {print s + 0}')
      fi
      status=0
      nice -n 19 "$LOADGEN" "${args[@]}" > "$OUT/runs/$tag.load.log" 2>&1 || status=$?
      if ((nodes > 1)); then
        redis_cpu_after=$(redis-cli -p "$REDIS_PORT" info cpu | awk -F: '/used_cpu_(sys|user):/ {s += $2} END {print s + 0}')
        redis-cli -p "$REDIS_PORT" info stats > "$OUT/runs/$tag.redis-stats.txt" 2>&1 || true
        echo "$redis_cpu_before $redis_cpu_after" > "$OUT/runs/$tag.redis-cpu.txt"
      fi
      [[ $name == barrage ]] && { curl -s -m 5 "http://127.0.0.1:$API_BASE/metrics" > "$OUT/runs/$tag.metrics.txt" || true; }
      stop_all
      if [[ ! -s $json ]]; then
        printf '{"label": "%s", "failed": "load generator exit %d, no report"}\n' "$server" "$status" > "$json"
      fi
      python3 - "$json" "$status" << 'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
if "delivered_per_s" in r:
    lat, reach = r.get("latency_ns") or {}, r.get("reach_all_ns") or {}
    print(f"   exit {sys.argv[2]}: {r['delivered_per_s']:,.0f} deliveries/s, p99 {lat.get('p99', 0) / 1e6:.1f} ms, "
          f"last member p99 {reach.get('p99', 0) / 1e6:.1f} ms, CPU {r.get('cpu_s_per_million_deliveries') or 0:.2f} s/1M, "
          f"lost {r.get('lost', 0):,}")
else:
    print(f"   {r.get('failed')}")
EOF
    done
  done
done

python3 bench/cluster_report.py "$OUT" "$COMMAND" >> bench/RESULTS.md
echo "appended to bench/RESULTS.md; reports under $OUT"
