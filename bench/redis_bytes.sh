#!/bin/bash
# Bytes Redis holds per stored message and per room, measured: a private redis-server, barrage
# with --redis, N chat messages (a 20-byte Chinese/English line, typical danmaku) published into
# R rooms through the API; then MEMORY USAGE of each room's keys and used_memory before/after.
# Usage: bench/redis_bytes.sh [ROOMS] [MESSAGES_PER_ROOM]
set -euo pipefail
cd "$(dirname "$0")/.."
ROOMS=${1:-100}
PER_ROOM=${2:-200}
PORT=${REDIS_PORT:-26391}
API=127.0.0.1:${API_PORT:-19091}
DIR=$(mktemp -d)
cargo build --release -q --bin barrage
redis-server --port "$PORT" --bind 127.0.0.1 --save "" --appendonly no --dir "$DIR" >/dev/null &
RPID=$!
trap 'kill $RPID ${GPID:-} 2>/dev/null; rm -rf "$DIR"' EXIT
until redis-cli -p "$PORT" ping >/dev/null 2>&1; do sleep 0.05; done
before=$(redis-cli -p "$PORT" info memory | awk -F: '/^used_memory:/{print $2}' | tr -d '\r')
./target/release/barrage --listen 127.0.0.1:19090 --api-listen "$API" --redis "redis://127.0.0.1:$PORT" \
    --room-rate-per-s 0 --presence-events false >/dev/null &
GPID=$!
until curl -sf "http://$API/healthz" >/dev/null; do sleep 0.05; done
python3 - "$API" "$ROOMS" "$PER_ROOM" <<'PY'
import http.client, json, sys
api, rooms, per = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
c = http.client.HTTPConnection(api)
for i in range(per):
    for r in range(rooms):
        body = json.dumps({"type": "chat", "text": f"主播好厉害 nice play {i:05d}", "sender": f"u{i % 97}"})
        c.request("POST", f"/v1/rooms/room{r}/messages", body, {"Content-Type": "application/json"})
        resp = c.getresponse(); resp.read()
        assert resp.status == 202, resp.status
PY
# Let the last blocks be cut and written.
last=$((ROOMS - 1))
until [ "$(redis-cli -p "$PORT" zcard "barrage:{room$last}:replay")" = "$PER_ROOM" ]; do sleep 0.1; done
curl -sf -XPUT "http://$API/v1/rooms/room0/attributes/seat1" -d '{"value":"alice"}' >/dev/null
curl -sf -XPOST "http://$API/v1/rooms/room0/bans" -d '{"user":"mallory","duration_ms":3600000}' >/dev/null
until [ "$(redis-cli -p "$PORT" exists "barrage:{room0}:ban:mallory")" = "1" ]; do sleep 0.05; done
after=$(redis-cli -p "$PORT" info memory | awk -F: '/^used_memory:/{print $2}' | tr -d '\r')
live=$(redis-cli -p "$PORT" memory usage "barrage:{room0}:live" SAMPLES 0)
replay=$(redis-cli -p "$PORT" memory usage "barrage:{room0}:replay" SAMPLES 0)
meta=$(redis-cli -p "$PORT" memory usage "barrage:{room0}:meta" SAMPLES 0)
nlive=$(redis-cli -p "$PORT" zcard "barrage:{room0}:live")
nreplay=$(redis-cli -p "$PORT" zcard "barrage:{room0}:replay")
msg=$(redis-cli -p "$PORT" --no-raw zrange "barrage:{room0}:live" -1 -1 | wc -c)
echo "rooms=$ROOMS messages_per_room=$PER_ROOM"
for r in 0 $((ROOMS - 1)); do echo "room$r live=$(redis-cli -p "$PORT" zcard "barrage:{room$r}:live") replay=$(redis-cli -p "$PORT" zcard "barrage:{room$r}:replay") last=$(redis-cli -p "$PORT" hget "barrage:{room$r}:meta" last)"; done
echo "live zset: $live B for $nlive messages ($((live / nlive)) B each)"
echo "replay zset: $replay B for $nreplay messages ($((replay / nreplay)) B each)"
echo "meta hash: $meta B per room"
for k in attrs attrlog ban ban:mallory; do echo "$k: $(redis-cli -p "$PORT" memory usage "barrage:{room0}:$k" SAMPLES 0) B (one entry)"; done
echo "used_memory grew $(( (after - before) / 1024 )) KiB: $(( (after - before) / (ROOMS * PER_ROOM) )) B per stored message, all keys"
