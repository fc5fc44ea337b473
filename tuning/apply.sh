#!/usr/bin/env bash
# Applies tuning/sysctl.d/60-barrage.conf to the running kernel, saving every value it changes
# so that `apply.sh --restore` puts them back. Needs root. Prints each change.
#
#   tuning/apply.sh              save current values, apply ours
#   tuning/apply.sh --restore    restore the saved values
#   STATE=/path tuning/apply.sh  where the saved values go (default /var/tmp/barrage-sysctl.saved)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
conf="$here/sysctl.d/60-barrage.conf"
state="${STATE:-/var/tmp/barrage-sysctl.saved}"

keys() { grep -Ev '^\s*(#|$)' "$conf" | sed -E 's/\s*=.*$//'; }
value_of() { grep -E "^\s*$1\s*=" "$conf" | sed -E 's/^[^=]*=\s*//'; }
key_path() { echo "/proc/sys/${1//./\/}"; }

if [[ "${1:-}" == "--restore" ]]; then
  [[ -f "$state" ]] || { echo "apply.sh: nothing saved at $state"; exit 0; }
  while IFS='=' read -r key value; do
    printf '%s\n' "$value" > "$(key_path "$key")" && echo "restored $key = $value"
  done < "$state"
  rm -f "$state"
  exit 0
fi

if [[ -f "$state" ]]; then
  echo "apply.sh: $state exists (an earlier apply was not restored); keeping those originals"
else
  : > "$state"
  for key in $(keys); do
    printf '%s=%s\n' "$key" "$(tr '\t' ' ' < "$(key_path "$key")")" >> "$state"
  done
fi
for key in $(keys); do
  want="$(value_of "$key")"
  have="$(tr '\t' ' ' < "$(key_path "$key")")"
  if [[ "$have" != "$want" ]]; then
    printf '%s\n' "$want" > "$(key_path "$key")"
    echo "set $key = $want (was $have)"
  fi
done
