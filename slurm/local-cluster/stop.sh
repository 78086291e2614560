#!/usr/bin/env bash
# Stops the daemons start.sh started (cancelling jobs first) and removes their pid files and sockets;
# keeps the controller state and the accounting database so that job ids keep increasing.
set -uo pipefail
source "$(dirname "$0")/common.sh"

# stop_daemon NAME: SIGTERM, then SIGKILL after 15 s.
stop_daemon() {
  local pid i
  if alive "$1"; then
    pid=$(cat "$D/run/$1.pid")
    kill -TERM "$pid" 2>/dev/null
    for ((i = 0; i < 150; i++)); do
      running "$pid" || break
      sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null
  fi
  rm -f "$D/run/$1.pid"
}

[ -d "$D" ] || exit 0
if [ -z "${HNCL_SLURM_LOCKED:-}" ]; then
  exec 9>"$D/.lock"
  flock -w 120 9 || { echo "hncl-slurm: another start.sh or stop.sh holds $D/.lock" >&2; exit 1; }
fi
if alive slurmctld; then
  jobs=$(timeout 5 squeue -h -o %i 2>/dev/null)
  if [ -n "$jobs" ]; then
    # shellcheck disable=SC2086
    timeout 5 scancel $jobs
    for ((i = 0; i < 100; i++)); do
      [ -z "$(timeout 5 squeue -h -t running,completing -o %i 2>/dev/null)" ] && break
      sleep 0.2
    done
  fi
fi
stop_daemon slurmd  # the single slurmd of the earlier one-node version of this cluster, if it still runs
for ((k = ${#DAEMONS[@]} - 1; k >= 0; k--)); do stop_daemon "${DAEMONS[k]}"; done
rm -f "$D/munge/munge.socket.2" "$D/munge/munge.socket.2.lock" "$MYSQL_UNIX_PORT"
echo "hncl-slurm: stopped ($D)"
