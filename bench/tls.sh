#!/usr/bin/env bash
# Issue 16's density bench: what an idle joined `wss://` connection costs the gateway in user
# space (RSS delta over N members), beside `ws://` in the same run, and the rate barrage takes TLS
# handshakes (all N opened a few hundred at a time by `barrage-load hold`, several processes from
# their own source addresses: RLIMIT_NOFILE is 20,000 a process). Certificate: ECDSA P-256,
# self-signed (openssl). MODES adds `deflate`: ws with permessage-deflate on and offered by every
# client (issue 17: the extension must not cost an idle connection anything). Appends a table
# to bench/RESULTS.md.
#
#   bench/tls.sh
#   N=20000 PROCS=2 bench/tls.sh
#   MODES="plain deflate" bench/tls.sh
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
N="${N:-100000}"
PROCS="${PROCS:-6}"
MODES="${MODES:-plain tls}"
PORT="${PORT:-18820}"
API_PORT="${API_PORT:-9393}"
STAMP="$(date -u +%Y%m%dT%H%M%SZ)"
OUT="bench/out/tls-$STAMP"
mkdir -p "$OUT"
cargo build --release --quiet --bin barrage --bin barrage-load
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout "$OUT/key.pem" -out "$OUT/cert.pem" \
  -days 2 -subj /CN=localhost -addext subjectAltName=DNS:localhost -addext basicConstraints=critical,CA:FALSE \
  -addext keyUsage=digitalSignature 2> /dev/null
ulimit -n 20000
per=$(( (N + PROCS - 1) / PROCS ))
gw="" holders=()
cleanup() {
  for p in "${holders[@]}" $gw; do kill "$p" 2> /dev/null || true; done
  wait 2> /dev/null || true
}
trap cleanup EXIT
for mode in $MODES; do
  extra=() client=()
  [[ $mode == tls ]] && extra=(--tls-cert "$OUT/cert.pem" --tls-key "$OUT/key.pem") && client=(--ca "$OUT/cert.pem")
  [[ $mode == deflate ]] && extra=(--deflate true) && client=(--deflate)
  ./target/release/barrage --listen "127.0.0.1:$PORT" --api-listen "127.0.0.1:$API_PORT" --connections-max $((N + 1000)) \
    --idle-timeout-ms 600000 --heartbeat-ms 300000 --presence-events false --addr-conn-rate-per-s 0 \
    --addr-request-rate-per-s 0 "${extra[@]}" > "$OUT/$mode.gateway.log" 2>&1 &
  gw=$!
  await_barrage
  sleep 1
  before=$(rss "$gw")
  cpu0=$(cpu "$gw")
  holders=()
  for i in $(seq "$PROCS"); do
    ./target/release/barrage-load hold --ws "127.0.0.1:$PORT" --connections "$per" --source "127.0.0.$((i + 1))" \
      "${client[@]}" --hold-s 3600 > "$OUT/$mode-$i.json" 2> "$OUT/$mode-$i.err" &
    holders+=($!)
  done
  for i in $(seq "$PROCS"); do
    for _ in $(seq 600); do [[ -s "$OUT/$mode-$i.json" ]] && break; sleep 0.5; done
  done
  cpu1=$(cpu "$gw")
  sleep 2
  after=$(rss "$gw")
  online=$(curl -s "http://127.0.0.1:$API_PORT/v1/rooms/hold" | python3 -c 'import json,sys; print(json.load(sys.stdin)["online"])')
  deflated=$(metric barrage_deflate_connections_total)
  echo "$mode before=$before after=$after online=$online cpu_ticks=$((cpu1 - cpu0)) deflated=$deflated" | tee "$OUT/$mode.rss"
  for p in "${holders[@]}"; do kill "$p" 2> /dev/null || true; done
  wait "${holders[@]}" 2> /dev/null || true
  holders=()
  kill "$gw"; wait "$gw" 2> /dev/null || true; gw=""
  sleep 2
done
python3 - "$OUT" "$STAMP" "N=$N PROCS=$PROCS MODES='$MODES' bench/tls.sh" "$MODES" >> bench/RESULTS.md << 'EOF'
import glob, json, os, platform, sys
out, stamp, command, modes = sys.argv[1:]
model = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
rows = {}
deflated = {}
for mode in modes.split():
    f = dict(kv.split("=") for kv in open(os.path.join(out, f"{mode}.rss")).read().split()[1:])
    runs = [json.loads(open(p).read().strip().splitlines()[0]) for p in sorted(glob.glob(os.path.join(out, f"{mode}-*.json")))]
    joined = sum(r["joined"] for r in runs)
    rate = joined / max(r["seconds"] for r in runs)
    cpu_us = int(f["cpu_ticks"]) / os.sysconf("SC_CLK_TCK") * 1e6 / max(joined, 1)
    rows[mode] = (int(f["after"]) - int(f["before"]), int(f["online"]), joined, sum(r["failed"] for r in runs), rate, cpu_us)
    deflated[mode] = int(f.get("deflated", 0))
names = {"plain": "ws", "tls": "wss", "deflate": "ws + permessage-deflate"}
print(f"\n## {stamp} {' against '.join(names[m] for m in modes.split())}: gateway memory per idle joined connection, and handshakes per second\n")
print(f"- Machine: {os.cpu_count()} cores ({model}), Linux {platform.release()}; gateway (release, 2 shards) and the `barrage-load hold` clients (rustls, ECDSA P-256 certificate) on the same cores, loopback.")
print(f"- Command: `{command}`; user-space bytes = the gateway's RSS after all joined minus before, ÷ members online; joins/s = members joined ÷ the slowest client process's time (TLS: TCP + TLS handshake + WebSocket upgrade + welcome, client crypto on the same cores); gateway CPU per join = its utime+stime over the ramp ÷ members joined, and its inverse the joins one gateway core would take with the clients elsewhere.\n")
print("| listener | members online | RSS delta | bytes per member | joins/s | gateway CPU µs per join | joins/s per gateway core | failed |")
print("|---|---:|---:|---:|---:|---:|---:|---:|")
for mode, (delta, online, joined, failed, rate, cpu_us) in rows.items():
    print(f"| {names[mode]} | {online:,} | {delta / 1e6:.1f} MB | {delta / max(online, 1):,.0f} | {rate:,.0f} | {cpu_us:.0f} | {1e6 / max(cpu_us, 1e-9):,.0f} | {failed} |")
if deflated.get("deflate"):
    print(f"- permessage-deflate negotiated on {deflated['deflate']:,} connections (`barrage_deflate_connections_total`).")
EOF
echo "appended to bench/RESULTS.md; reports under $OUT"
