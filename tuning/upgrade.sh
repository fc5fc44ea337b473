#!/bin/sh
# Zero-downtime upgrade with tuning/barrage@.service: install the new binary first, then run
# this. It starts the idle instance (which takes over the running one's listeners and rooms
# through upgrade.control_socket) and waits for the old instance to drain and exit.
set -eu
active=""
for i in a b; do
    if systemctl is-active --quiet "barrage@$i"; then active=$i; fi
done
case "$active" in
    a) next=b ;;
    *) next=a ;;
esac
echo "barrage: starting barrage@$next${active:+, which takes over barrage@$active}"
systemctl start "barrage@$next"
if [ -n "$active" ]; then
    # The old instance exits by itself once its viewers have moved (drain.deadline_ms at most).
    while systemctl is-active --quiet "barrage@$active"; do sleep 1; done
    echo "barrage: barrage@$active drained and exited; barrage@$next serves"
fi
