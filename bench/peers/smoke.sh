#!/usr/bin/env bash
# Quick self-check of every fan-out server against the peer contract: installs what is missing
# (install.sh, idempotent), builds the floor, then starts each server on a loopback port, runs
# smoke.py against it and stops it. Prints one line per server; exits non-zero if any failed.
#
#   bench/peers/smoke.sh                  # every server
#   bench/peers/smoke.sh floor nchan      # some
set -uo pipefail
peers="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$peers/../.." && pwd)"
python="$root/bench/out/venv/bin/python"
port="${PORT:-18300}"
servers=("$@")
((${#servers[@]})) || servers=(floor floor8 floor32 uws uwsjs ws tungstenite fastwebsockets nchan)

"$peers/install.sh" > "$root/bench/out/install.log" 2>&1 || { tail -5 "$root/bench/out/install.log"; exit 1; }
(cd "$root" && cargo build --release --quiet --bin barrage-floor) || exit 1

listening() { ss -Hltn "sport = :$1" | grep -q .; }
failed=0
for name in "${servers[@]}"; do
  port=$((port + 1))
  log="$root/bench/out/smoke-$name.log"
  "$peers/run.sh" "$name" "$port" 2 > "$log" 2>&1 &
  pid=$!
  for _ in $(seq 100); do listening "$port" && break; sleep 0.1; done
  extra=()
  [[ $name == nchan ]] && extra=(--nchan)
  if result=$("$python" "$peers/smoke.py" "$port" "${extra[@]}" 2>&1); then
    printf '%-15s %s\n' "$name" "$result"
  else
    printf '%-15s %s (server log: %s)\n' "$name" "$result" "$log"
    failed=1
  fi
  kill "$pid" 2> /dev/null
  wait "$pid" 2> /dev/null
done
exit "$failed"
