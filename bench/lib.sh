# Helpers shared by the side-by-side bench scripts (sourced: `. bench/lib.sh`).

# cpu PID: the process's utime + stime, in clock ticks.
cpu() { awk '{print $14 + $15}' "/proc/$1/stat"; }

# rss PID: the process's resident set, in bytes.
rss() { awk '/VmRSS/ {print $2 * 1024}' "/proc/$1/status"; }

# metric NAME [LABEL]: the sum over shards of barrage's series NAME on the API at $API_PORT
# (only those with LABEL, e.g. stage="in", when given).
metric() {
  curl -s "http://127.0.0.1:$API_PORT/metrics" | awk -v n="$1" -v l="${2:-}" \
    'index($1, n) == 1 && (length($1) == length(n) || substr($1, length(n) + 1, 1) == "{") && index($1, l) {s += $2} END {printf "%d", s}'
}

# await_barrage: until barrage's API at $API_PORT answers (at most 5 s).
await_barrage() {
  for _ in $(seq 100); do curl -s -m 1 "http://127.0.0.1:$API_PORT/healthz" > /dev/null && return; sleep 0.05; done
}

# await_line TEXT FILE: until FILE (a peer's log) holds TEXT (at most 5 s).
await_line() {
  for _ in $(seq 100); do grep -q "$1" "$2" 2> /dev/null && return; sleep 0.05; done
}

# round_modes R MODES: MODES in order for odd rounds, reversed for even ones (so neither side
# always runs first on a machine that warms up or slows down).
round_modes() {
  if (( $1 % 2 == 0 )); then echo "$2" | tr ' ' '\n' | tac | tr '\n' ' '; else echo "$2"; fi
}

# One room's members held by `barrage-load hold --read` in the background (pid in $holder),
# waited for until they are all in (its report written) or it gives up. $1: output prefix
# ($1.hold.json, $1.hold.err); $2: the last octet of its source address; the rest: more flags.
start_holder() {
  local out=$1 octet=$2
  shift 2
  nice -n 10 taskset -c 0,1 ./target/release/barrage-load hold --ws "127.0.0.1:$PORT" --connections "$MEMBERS" --room r0 \
    --source "127.0.0.$octet" --read --hold-s $((DURATION_S + 4)) "$@" > "$out.hold.json" 2> "$out.hold.err" &
  holder=$!
  for _ in $(seq 600); do [[ -s "$out.hold.json" ]] || ! kill -0 "$holder" 2> /dev/null && break; sleep 0.2; done
}
