#!/usr/bin/env bash
# Zero-downtime upgrade under load: CONNECTIONS (200,000) WebSocket clients in ROOMS (100) rooms of
# a running barrage (the old process) while PUBLISH (50) messages a second are posted round the
# rooms through the business API; after STEADY_S (30 s) a new barrage starts with --takeover, takes
# the listeners and the rooms, and the old one drains its clients into it at the new one's
# --drain-reconnect-rate-per-s and exits. Publishing goes on through the hand-over and AFTER_S
# (15 s) past the old process's exit, then stops; every client must then reach its room's last seq.
# One fresh pair of processes per drain rate in RATES ("2000 10000": the default rate, and a
# faster one for the trade-off), REPEAT (1) times each.
#
# The clients are `barrage-load upgrade` (bench/loadgen/README.md): each follows the README's client
# algorithm — per-client last seq, messages at or below it dropped (duplicates suppressed), a seq
# past last + 1 a gap (short-polled on the public port; what the history no longer has is LOST), on
# `reconnect` wait its delayMs and reconnect with ?room=R&after=LAST, on an unexpected close back
# off and reconnect. The publisher retries 503s (rooms frozen while they move) and lost connections
# (the old process closes its API connections once the new one serves). Every second a TSV row of
# both processes' RSS and VmHWM (/proc), the API's /metrics (the new process's handshakes), and the
# clients' and publisher's counts; bench/upgrade_report.py draws the plot and appends the figures to
# bench/RESULTS.md.
#
#   bench/upgrade.sh                                           # 200,000 clients, drains at 2,000/s and 10,000/s
#   CONNECTIONS=20000 RATES=2000 STEADY_S=10 bench/upgrade.sh  # a quick check
#
# History: a client still on the old process while the drain runs sees nothing new (the old
# process's rooms are frozen from the hand-over on) and gets what it missed in its resume backfill
# from the new process's history, so rooms.history_messages_max must cover a room's traffic over
# the whole drain: PUBLISH / ROOMS per second × (CONNECTIONS / RATE + delay + jitter). At the
# defaults: 0.5/s × (100 s + 2.5 s) ≈ 52 messages at 2,000/s, against a default history of 50 —
# so HISTORY is 200 here (4× the need at the slowest rate); the script refuses a HISTORY below
# twice the need of the slowest rate.
#
# Needs root (sysctls: tuning/apply.sh, restored on exit, as bench/soak.sh). Loopback only;
# bounded: the generator stops by itself (its --deadline-s, and `timeout` around it), then both
# gateways are ended.
set -euo pipefail
cd "$(dirname "$0")/.."

CONNECTIONS="${CONNECTIONS:-200000}"
ROOMS="${ROOMS:-100}"
PUBLISH="${PUBLISH:-50}"
MESSAGE_BYTES="${MESSAGE_BYTES:-100}"
RATES="${RATES:-2000 10000}"
REPEAT="${REPEAT:-1}"
STEADY_S="${STEADY_S:-30}"
AFTER_S="${AFTER_S:-15}"
CATCHUP_S="${CATCHUP_S:-120}"
HISTORY="${HISTORY:-200}"
RAMP_RATE="${RAMP_RATE:-5000}"
THREADS="${THREADS:-2}"
DELAY_MS="${DELAY_MS:-500}"
JITTER_MS="${JITTER_MS:-2000}"
PORT="${PORT:-18970}"
API_PORT="${API_PORT:-19970}"
# Each run binds its own /24 (SOURCE_BASE.NET+k.1 ...), so the TIME_WAIT pairs a run leaves never
# meet the next; a run holds every client and reconnects each once from a fresh pair: 2 × N pairs,
# and a quarter spare, at 51,000 ports an address.
SOURCE_BASE="${SOURCE_BASE:-127.0}"
SOURCE_NET="${SOURCE_NET:-80}"
SOURCES=$(((2 * CONNECTIONS + 8192) * 5 / 4 / 51000 + 2))
STAMP="$(date -u +%Y%m%dT%H%M%SZ)"
OUT="bench/out/upgrade-$STAMP"
PLOT="bench/plots/upgrade-$CONNECTIONS-$STAMP.svg"
COMMAND="CONNECTIONS=$CONNECTIONS ROOMS=$ROOMS PUBLISH=$PUBLISH RATES='$RATES' REPEAT=$REPEAT STEADY_S=$STEADY_S AFTER_S=$AFTER_S HISTORY=$HISTORY bench/upgrade.sh"
mkdir -p "$OUT" bench/plots

slowest=$(printf '%s\n' $RATES | sort -n | head -1)
need=$(python3 -c "print(int($PUBLISH / $ROOMS * ($CONNECTIONS / $slowest + ($DELAY_MS + $JITTER_MS) / 1000) + 1))")
if ((HISTORY < 2 * need)); then
  echo "upgrade.sh: HISTORY=$HISTORY is under twice a room's traffic over the slowest drain ($need messages)" >&2
  exit 2
fi
if ((SOURCES > 250)); then
  echo "upgrade.sh: $CONNECTIONS clients need $SOURCES source addresses a run, more than a /24" >&2
  exit 2
fi

cargo build --release --quiet --bin barrage --bin barrage-load

old_pid=""
new_pid_file=""
stop_gateways() {
  local pids=()
  [[ -n "$old_pid" ]] && pids+=("$old_pid")
  [[ -n "$new_pid_file" && -s "$new_pid_file" ]] && pids+=("$(cat "$new_pid_file")")
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2> /dev/null || true; done
  # A second SIGTERM ends a drain at once (the clients are gone anyway).
  sleep 0.5
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2> /dev/null || true; done
  for pid in "${pids[@]}"; do
    for _ in $(seq 100); do kill -0 "$pid" 2> /dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2> /dev/null || true
  done
  [[ -n "$old_pid" ]] && { wait "$old_pid" 2> /dev/null || true; }
  old_pid=""
  new_pid_file=""
}
cleanup() {
  stop_gateways
  STATE="$OUT/sysctl.saved" tuning/apply.sh --restore
}
trap cleanup EXIT
STATE="$OUT/sysctl.saved" tuning/apply.sh

# Both processes run the same config, as an upgrade would: idle timeouts longer than the run (the
# clients do not ping), connection room above the count, no per-address rates (a few source
# addresses open every connection), the history above, and the control socket. Defaults otherwise.
IDLE_MS=1800000
gateway_flags() {
  echo "--connections-max $((CONNECTIONS + 50000)) --rooms-max $((ROOMS * 2)) --history-messages-max $HISTORY \
--handshake-timeout-ms 120000 --heartbeat-ms $((IDLE_MS / 2)) --idle-timeout-ms $IDLE_MS \
--addr-conn-rate-per-s 0 --addr-request-rate-per-s 0 --drain-delay-ms $DELAY_MS --drain-jitter-ms $JITTER_MS"
}
GATEWAY_FLAGS="$(gateway_flags)"

runs=()
k=0
for rate in $RATES; do
  for rep in $(seq "$REPEAT"); do
    net=$((SOURCE_NET + k))
    run="$OUT/rate-$rate-$rep"
    mkdir -p "$run"
    sock="$run/control.sock"
    listen="--listen 127.0.0.1:$PORT --api-listen 127.0.0.1:$API_PORT --upgrade-control-socket $sock"
    # shellcheck disable=SC2086
    ./target/release/barrage $listen $GATEWAY_FLAGS > "$run/old.log" 2>&1 &
    old_pid=$!
    new_pid_file="$run/new.pid"
    for _ in $(seq 100); do
      ss -Hltn "sport = :$API_PORT" | grep -q . && break
      sleep 0.1
    done
    head -3 "$run/old.log"
    # The new process: the same flags, --takeover, and the drain rate it sends the old one.
    takeover="echo \$\$ > $new_pid_file; exec ./target/release/barrage $listen $GATEWAY_FLAGS --takeover \
--drain-reconnect-rate-per-s $rate > $run/new.log 2>&1"
    cat > "$run/meta.json" << JSON
{"stamp": "$STAMP", "command": "$COMMAND", "connections": $CONNECTIONS, "rooms": $ROOMS, "publish": $PUBLISH,
 "message_bytes": $MESSAGE_BYTES, "rate": $rate, "repeat": $rep, "steady_s": $STEADY_S, "after_s": $AFTER_S,
 "history": $HISTORY, "history_need": $need, "delay_ms": $DELAY_MS, "jitter_ms": $JITTER_MS, "threads": $THREADS,
 "ramp_rate": $RAMP_RATE, "sources": "$SOURCE_BASE.$net.1-$SOURCE_BASE.$net.$SOURCES",
 "gateway_flags": "$GATEWAY_FLAGS", "plot": "$PLOT"}
JSON
    # The generator at nice 19: the gateways must not starve behind it on two cores (the new
    # gateway is put back to nice 0 by the generator when it starts it).
    drain_wait=$((CONNECTIONS / rate + 120))
    deadline=$((CONNECTIONS / RAMP_RATE + 30 + 90 + STEADY_S + drain_wait + AFTER_S + CATCHUP_S + 60))
    status=0
    timeout $((deadline + 60)) nice -n 19 ./target/release/barrage-load upgrade \
      --target "127.0.0.1:$PORT" --api "127.0.0.1:$API_PORT" \
      --connections "$CONNECTIONS" --rooms "$ROOMS" --rate "$RAMP_RATE" \
      --publish-per-s "$PUBLISH" --message-bytes "$MESSAGE_BYTES" \
      --steady-s "$STEADY_S" --after-s "$AFTER_S" --catchup-s "$CATCHUP_S" --drain-wait-s "$drain_wait" \
      --takeover-cmd "$takeover" --gateway-pid "$old_pid" --label "drain $rate/s" \
      --sources "$SOURCE_BASE.$net.1-$SOURCE_BASE.$net.$SOURCES" --ports 10000-60999 --threads "$THREADS" \
      --deadline-s "$deadline" --tsv "$run/samples.tsv" --json "$run/load.json" 2>&1 | tee "$run/load.log" \
      || status=$?
    echo "$status" > "$run/status"
    echo "load generator exit $status ($run)"
    stop_gateways
    runs+=("$run")
    k=$((k + 1))
    sleep 2
  done
done

python3 bench/upgrade_report.py "$PLOT" "${runs[@]}" >> bench/RESULTS.md
echo "appended to bench/RESULTS.md; plot $PLOT; runs in $OUT"
