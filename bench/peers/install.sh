#!/usr/bin/env bash
# Installs what every fan-out comparison peer needs, from the registries, and checks that each
# one loads. Idempotent: a second run changes nothing and takes seconds.
#
#   Debian   nginx + libnginx-mod-nchan (the Nchan peer), libuv1 (socketify loads it)
#   PyPI     socketify (the uWebSockets peer) and websockets (smoke.py) into bench/out/venv
#   npm      ws into ws/, uwebsockets (uWebSockets.js binaries) into uwsjs/, socket.io with
#            @socket.io/redis-adapter into socketio/, @soketi/soketi into soketi/
#   crates   the tokio-tungstenite and fastwebsockets peers, cargo build --release into
#            bench/out/cargo-peers (each is a standalone project with its own [workspace])
#
# Exits non-zero, naming what failed, if anything cannot be installed. Needs root for apt-get.
set -euo pipefail
peers="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$peers/../.." && pwd)"
out="$root/bench/out"
venv="$out/venv"
mkdir -p "$out"

fail() {
  echo "install.sh: FAILED: $*" >&2
  exit 1
}
step() { echo "install.sh: $*"; }

# --- Debian ---------------------------------------------------------------------------------
debs=(nginx libnginx-mod-nchan libuv1)
missing=()
for p in "${debs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  [[ $EUID -eq 0 ]] || fail "apt-get install ${missing[*]} needs root"
  step "apt-get install ${missing[*]}"
  apt-get update -qq || fail "apt-get update"
  # Keep the packages' maintainer scripts from starting a system nginx on port 80: the bench
  # runs its own nginx with its own config (nchan/nginx.conf).
  policy=/usr/sbin/policy-rc.d
  made_policy=0
  if [[ ! -e $policy ]]; then
    printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod +x "$policy" && made_policy=1
  fi
  status=0
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" || status=$?
  ((made_policy)) && rm -f "$policy"
  ((status == 0)) || fail "apt-get install ${missing[*]} (exit $status)"
fi
nchan_so=/usr/lib/nginx/modules/ngx_nchan_module.so
[[ -f $nchan_so ]] || fail "libnginx-mod-nchan installed but $nchan_so is missing"
step "$(nginx -v 2>&1)"

# --- PyPI -----------------------------------------------------------------------------------
if [[ ! -x $venv/bin/python ]]; then
  step "python venv $venv"
  python3 -m venv "$venv" || fail "python3 -m venv (is python3-venv there?)"
fi
if ! "$venv/bin/python" -c 'import socketify, websockets' 2>/dev/null; then
  step "pip install socketify websockets"
  "$venv/bin/pip" install -q --disable-pip-version-check socketify==0.0.31 websockets==15.0.1 \
    || fail "pip install socketify websockets"
fi
"$venv/bin/python" -c 'import socketify' || fail "socketify installed but does not import (libuv1?)"

# --- npm ------------------------------------------------------------------------------------
command -v node > /dev/null || fail "node is not on PATH"
for peer in ws uwsjs socketio soketi; do
  if [[ ! -d $peers/$peer/node_modules ]] || [[ $peers/$peer/package.json -nt $peers/$peer/node_modules ]]; then
    step "npm install in $peer/"
    (cd "$peers/$peer" && npm install --no-audit --no-fund --loglevel=error) || fail "npm install in $peer/"
    touch "$peers/$peer/node_modules"
  fi
done
(cd "$peers/ws" && node -e "require('ws')") || fail "npm ws installed but does not load"
(cd "$peers/uwsjs" && node -e "require('uwebsockets')") \
  || fail "npm uwebsockets installed but does not load on node $(node --version) (no binary for this ABI?)"
(cd "$peers/socketio" && node -e "require('socket.io'); require('@socket.io/redis-adapter')") \
  || fail "npm socket.io with the redis adapter installed but does not load"
[[ -x $peers/soketi/node_modules/.bin/soketi ]] || fail "npm @soketi/soketi installed but has no soketi binary"

# --- crates ---------------------------------------------------------------------------------
for peer in tungstenite fastwebsockets; do
  step "cargo build --release $peer/"
  CARGO_TARGET_DIR="$out/cargo-peers" cargo build --release --quiet --locked \
    --manifest-path "$peers/$peer/Cargo.toml" || fail "cargo build of $peer/"
done

step "all peers installed: uws (socketify), uwsjs (uWebSockets.js), ws, socketio, soketi, tungstenite, fastwebsockets, nchan"
