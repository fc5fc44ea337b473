#!/usr/bin/env bash
# One command for the density claim: tune the kernel (saving the old values), start the gateway
# and the load generator on this box, ramp to N joined connections, hold them, deliver one block
# to every one, append the figures to bench/RESULTS.md with a plot, and restore the sysctls.
#
#   bench/million.sh                       # 1,000,000 connections
#   N=1500000 RATE=40000 bench/million.sh  # the stretch
#
# Needs root (sysctls). Loopback only; bounded in count and time; stops by itself.
set -euo pipefail
cd "$(dirname "$0")/.."

N="${N:-1000000}"
ROOMS="${ROOMS:-1000}"
RATE="${RATE:-50000}"
HOLD_S="${HOLD_S:-30}"
THREADS="${THREADS:-2}"
# The rate is a ceiling; near a million the box does far less (7-10k/s), so allow the time.
RAMP_S="${RAMP_S:-900}"
PORT="${PORT:-8080}"
API_PORT="${API_PORT:-9090}"
# Source addresses: 127.0.1.1 .. 127.0.1.S, ports 10000-60999 each (51,000 per address).
SOURCES="${SOURCES:-$(( (N + 50999) / 51000 + 1 ))}"
DEADLINE_S="${DEADLINE_S:-1800}"
STAMP="$(date -u +%Y%m%dT%H%M%SZ)"
OUT="bench/out"
REPORT="$OUT/connect-$N-$STAMP.json"
PLOT="bench/plots/connect-$N-$STAMP.svg"
mkdir -p "$OUT" bench/plots

cargo build --release --quiet --bin barrage --bin barrage-load

gateway_pid=""
cleanup() {
  [[ -n "$gateway_pid" ]] && kill "$gateway_pid" 2>/dev/null && wait "$gateway_pid" 2>/dev/null || true
  STATE="$OUT/sysctl.saved" tuning/apply.sh --restore
}
trap cleanup EXIT

STATE="$OUT/sysctl.saved" tuning/apply.sh
./target/release/barrage doctor --connections "$N" --with-loadgen || true

# Idle timeouts longer than the run: the probe measures holding, not heartbeats.
./target/release/barrage \
  --listen "127.0.0.1:$PORT" --api-listen "127.0.0.1:$API_PORT" \
  --connections-max "$((N + 10000))" --rooms-max "$((ROOMS * 2))" \
  --handshake-timeout-ms 120000 --heartbeat-ms 1800000 --idle-timeout-ms 3600000 \
  --addr-conn-rate-per-s 0 --addr-request-rate-per-s 0 \
  > "$OUT/gateway-$STAMP.log" 2>&1 &
gateway_pid=$!
sleep 1
head -3 "$OUT/gateway-$STAMP.log"

# nice 19: the gateway's acceptor must not starve behind the generator on two cores.
status=0
nice -n 19 ./target/release/barrage-load connect \
  --target "127.0.0.1:$PORT" --api "127.0.0.1:$API_PORT" \
  --connections "$N" --rooms "$ROOMS" --rate "$RATE" --hold-s "$HOLD_S" --ramp-s "$RAMP_S" \
  --sources "127.0.1.1-127.0.1.$SOURCES" --ports 10000-60999 \
  --threads "$THREADS" --gateway-pid "$gateway_pid" --deadline-s "$DEADLINE_S" --json "$REPORT" || status=$?

# The gateway's own view before it stops: rings driven.
GATEWAY_RINGS=$(curl -s "127.0.0.1:$API_PORT/metrics" | awk '/^barrage_rings\{/ {s += $2} END {print s + 0}')
export GATEWAY_RINGS
python3 bench/plot.py "$REPORT" "$PLOT"
python3 - "$REPORT" "$PLOT" "$N" "$RATE" "$ROOMS" "$HOLD_S" "$status" "$STAMP" >> bench/RESULTS.md <<'EOF'
import json, os, platform, sys
r = json.load(open(sys.argv[1]))
plot, n, rate, rooms, hold, status, stamp = sys.argv[2:9]
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
mem = int(next(l.split()[1] for l in open("/proc/meminfo") if l.startswith("MemTotal"))) / 2**20
b = r.get("blocks", {})
print(f"""
## {stamp} connect: {r['connections_held']:,} joined connections (target {int(n):,})

- Machine: {os.cpu_count()} cores ({cpu}), {mem:.0f} GiB, Linux {platform.release()}; gateway and
  load generator on the same box, loopback, tuning/apply.sh applied and restored.
- Command: `N={n} RATE={rate} ROOMS={rooms} HOLD_S={hold} bench/million.sh` (exit {status}); load
  generator: {r.get('threads', '?')} threads, {r.get('rings', '?')} rings; gateway: {os.environ.get('GATEWAY_RINGS', '?')} rings.
- Held {r['connections_held']:,}, joined {r['joined']:,}; ramp {r['ramp_s']:.1f} s, handshakes/s mean
  {r['handshakes_per_s_mean']:,.0f}, peak {r['handshakes_per_s_peak']:,.0f}.
- Gateway RSS {r['gateway_rss_before_bytes']/2**20:.1f} MiB before → {r['gateway_rss_after_ramp_bytes']/2**20:.1f} MiB
  held: **{r['gateway_bytes_per_conn']:.0f} B per connection**.
- Kernel slab {r['slab_before_bytes']/2**30:.2f} → {r['slab_after_ramp_bytes']/2**30:.2f} GiB:
  **{r['kernel_bytes_per_pair']:.0f} B per loopback pair** (both ends).
- Load generator: {r['loadgen_bytes_per_conn']:.0f} B per connection ({r['loadgen_rss_bytes']/2**20:.0f} MiB RSS).
- Block probe: {b.get('probed_rooms', 0)} rooms published, {b.get('reached', 0):,} connections reached,
  {b.get('missing', 0):,} missing.
- Errors: {json.dumps(r.get('errors', {}))}
- Plot: [{os.path.basename(plot)}](plots/{os.path.basename(plot)}); report: `{sys.argv[1]}`.""")
EOF
echo "appended to bench/RESULTS.md; plot $PLOT"
exit "$status"
