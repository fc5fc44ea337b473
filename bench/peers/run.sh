#!/usr/bin/env bash
# Runs one fan-out server in the foreground (exec: the caller's $! is the server's pid), the way
# bench/fanout.sh and smoke.sh start them. Build first: bench/peers/install.sh for the peers,
# `cargo build --release --bin barrage-floor` for the floor.
#
#   run.sh NAME PORT [THREADS] [MEMBERS]
#
# NAME: floor | floor8 | floor32 (barrage-floor, 1 / 8 / 32 frames per send), uws (socketify),
# uwsjs (uWebSockets.js), ws (Node ws), tungstenite, fastwebsockets, nchan.
# THREADS is used where the server can use it: tokio worker threads, nginx workers. The others
# are single-threaded by design (floor, uWS in Python or Node, Node ws). MEMBERS only sizes
# Nchan: its workers are processes with an fd cap each, so it gets at least one per 15,000.
set -euo pipefail
peers="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$peers/../.." && pwd)"
out="$root/bench/out"
name="${1:?usage: run.sh NAME PORT [THREADS] [MEMBERS]}"
port="${2:?usage: run.sh NAME PORT [THREADS] [MEMBERS]}"
threads="${3:-2}"
members="${4:-0}"

case "$name" in
  floor) exec "$root/target/release/barrage-floor" --port "$port" --frames-per-send 1 ;;
  floor8) exec "$root/target/release/barrage-floor" --port "$port" --frames-per-send 8 ;;
  floor32) exec "$root/target/release/barrage-floor" --port "$port" --frames-per-send 32 ;;
  uws) exec "$out/venv/bin/python" "$peers/uws/server.py" "$port" ;;
  uwsjs) exec node "$peers/uwsjs/server.js" "$port" ;;
  ws) exec node "$peers/ws/server.js" "$port" ;;
  tungstenite) exec "$out/cargo-peers/release/peer-tungstenite" "$port" "$threads" ;;
  fastwebsockets) exec "$out/cargo-peers/release/peer-fastwebsockets" "$port" "$threads" ;;
  nchan)
    workers=$(( (members + 14999) / 15000 ))
    (( workers < threads )) && workers=$threads
    prefix="$out/nchan-$port"
    rm -rf "$prefix" && mkdir -p "$prefix"
    sed -e "s|@PORT@|$port|g" -e "s|@WORKERS@|$workers|g" -e "s|@PREFIX@|$prefix|g" \
      "$peers/nchan/nginx.conf" > "$prefix/nginx.conf"
    echo "nchan peer on 127.0.0.1:$port, $workers nginx workers" >&2
    exec nginx -p "$prefix" -c "$prefix/nginx.conf" -e "$prefix/error.log"
    ;;
  *) echo "run.sh: unknown server $name" >&2; exit 2 ;;
esac
