#!/usr/bin/env bash
# Starts the two-node test cluster as root without systemd: munged, MariaDB (socket only), slurmdbd,
# slurmctld and one slurmd per node (hncl-n1, hncl-n2 on this host, each in its own mount and UTS namespace
# so that it has its own hostname and the node names resolve there), all with their state, logs and keys
# under $HNCL_SLURM_DIR (/tmp/hncl-slurm). HNCL_SLURM_PORT_BASE (6817) moves all ports: a second cluster
# can run beside the first.
# Idempotent: returns at once when the cluster is already up. Clients need SLURM_CONF (printed).
set -euo pipefail
shopt -s nullglob
HERE=$(cd "$(dirname "$0")" && pwd)
source "$HERE/common.sh"
TIMEOUT=${HNCL_SLURM_TIMEOUT:-60}
t0=$SECONDS

# fail MESSAGE: print it with the daemon logs and stop what this run started (no half-up cluster left).
fail() {
  local f report="hncl-slurm: $1"
  for f in "$D"/log/{slurmctld,slurmd-*,slurmdbd,mariadb,munged}.log; do
    [ -s "$f" ] && report+=$'\n'"----- $f (last 25 lines)"$'\n'"$(tail -n 25 "$f")"
  done
  [ -n "${locked:-}" ] && HNCL_SLURM_LOCKED=1 bash "$HERE/stop.sh" >/dev/null
  echo "$report" >&2
  exit 1
}

# wait_for WHAT CMD...: poll CMD until it succeeds; fail with the logs after TIMEOUT seconds, or at once
# when a daemon started so far has written its pid file and died.
wait_for() {
  local what=$1 name
  shift
  until "$@" >/dev/null 2>&1; do
    for name in "${DAEMONS[@]}"; do
      [ -s "$D/run/$name.pid" ] && ! alive "$name" && fail "$name exited while waiting for $what"
    done
    ((SECONDS - t0 < TIMEOUT)) || fail "timed out after ${TIMEOUT}s waiting for $what"
    sleep 0.2
  done
}

[ "$(id -u)" = 0 ] || fail "start.sh must run as root (the daemons run as root)"
export PATH=$PATH:/usr/sbin:/sbin
for b in munged mariadbd mariadb-install-db mariadb-admin slurmdbd slurmctld slurmd sbatch sacctmgr unshare; do
  command -v "$b" >/dev/null || fail "$b not found: run slurm/local-cluster/install.sh"
done

mkdir -p "$D"/{etc,run,log,munge,mysql,spool/ctld,spool/d} "${NODES[@]/#/$D/spool/d/}" "${NODES[@]/#/$D/scratch/}"
chmod 755 "$D" "$D/munge"
exec 9>"$D/.lock"  # the daemons are started with 9>&- so that they do not hold the lock
flock -w 120 9 || fail "another start.sh or stop.sh holds $D/.lock"
locked=1

cpus=$(nproc)
((cpus >= 4)) || cpus=4
for conf in slurm.conf slurmdbd.conf; do
  sed -e "s|@DIR@|$D|g" -e "s|@HOST@|$HOST|g" -e "s|@CPUS@|$cpus|g" -e "s|@CTLD_PORT@|$PORT_BASE|g" \
    -e "s|@DBD_PORT@|$((PORT_BASE + 2))|g" -e "s|@SLURMD_PORT1@|$((PORT_BASE + 3))|g" \
    -e "s|@SLURMD_PORT2@|$((PORT_BASE + 4))|g" "$HERE/$conf.in" >"$D/etc/$conf.new"
done
if healthy && cmp -s "$D/etc/slurm.conf.new" "$SLURM_CONF" \
  && cmp -s "$D/etc/slurmdbd.conf.new" "$D/etc/slurmdbd.conf"; then
  rm "$D"/etc/*.new
  summary "already running"
  exit 0
fi
# half up, or up with an outdated config: stop it before starting again
HNCL_SLURM_LOCKED=1 bash "$HERE/stop.sh" >/dev/null
mv "$D/etc/slurm.conf.new" "$SLURM_CONF"
mv "$D/etc/slurmdbd.conf.new" "$D/etc/slurmdbd.conf"
chmod 600 "$D/etc/slurmdbd.conf"
: >"$D/etc/plugstack.conf"
# The nodes' /etc/hosts (bind-mounted in their namespaces): this host's, plus the node names.
{ cat /etc/hosts; echo "127.0.0.1 ${NODES[*]}"; } >"$D/etc/hosts"
# Node-local scratch: both nodes share /tmp, so each task's TMPDIR is its node's own directory.
cat >"$D/etc/task_prolog.sh" <<PROLOG
#!/bin/sh
echo "export TMPDIR=$D/scratch/\$SLURMD_NODENAME"
PROLOG
chmod 755 "$D/etc/task_prolog.sh"
for f in "$D"/log/*.log; do mv -f "$f" "$f.prev"; done  # so that a failure shows this start's logs only

# munge: a private key and socket, so the cluster never depends on the system's munged.
if [ ! -s "$D/munge/munge.key" ]; then
  dd if=/dev/urandom of="$D/munge/munge.key" bs=1024 count=1 status=none
  chmod 400 "$D/munge/munge.key"
fi
munged --key-file="$D/munge/munge.key" --socket="$D/munge/munge.socket.2" \
  --pid-file="$D/run/munged.pid" --seed-file="$D/munge/munged.seed" --log-file="$D/log/munged.log" 9>&- \
  || fail "munged did not start"
wait_for "munged" alive munged

# MariaDB for slurmdbd: no TCP port, root authenticates through the socket.
if [ ! -d "$D/mysql/data/mysql" ]; then
  mariadb-install-db --no-defaults --datadir="$D/mysql/data" --user=root --skip-test-db \
    --auth-root-authentication-method=socket >"$D/log/mariadb-install.log" 2>&1 \
    || fail "mariadb-install-db failed: $(tail -n 25 "$D/log/mariadb-install.log")"
fi
setsid mariadbd --no-defaults --datadir="$D/mysql/data" --socket="$MYSQL_UNIX_PORT" \
  --pid-file="$D/run/mariadbd.pid" --log-error="$D/log/mariadb.log" --user=root --skip-networking \
  --innodb-lock-wait-timeout=900 </dev/null >/dev/null 2>&1 9>&- &
wait_for "mariadbd" mariadb-admin --no-defaults --socket="$MYSQL_UNIX_PORT" -u root --silent ping

slurmdbd 9>&- || fail "slurmdbd did not start"
wait_for "slurmdbd" timeout 5 sacctmgr -n -P show cluster format=cluster
sacctmgr -n -P show cluster format=cluster | grep -qx "$CLUSTER" || sacctmgr -i add cluster "$CLUSTER" >/dev/null
if ! sacctmgr -n -P show account default format=account | grep -qx default; then
  sacctmgr -i add account default Cluster="$CLUSTER" Description=tests Organization=hncl >/dev/null
  sacctmgr -i add user root Account=default Cluster="$CLUSTER" >/dev/null
fi

slurmctld -i 9>&- || fail "slurmctld did not start"
for node in "${NODES[@]}"; do
  unshare -m -u --propagation private sh -c \
    "mount --bind '$D/etc/hosts' /etc/hosts && hostname '$node' && exec slurmd -N '$node'" 9>&- \
    || fail "slurmd of node $node did not start"
done
# all_nodes_up: every node idle (a node left down or drained by an earlier run is resumed).
all_nodes_up() {
  local line
  nodes_up && return 0
  while read -r line; do
    case "${line#* }" in
      down* | drain*) scontrol update NodeName="${line%% *}" State=RESUME 2>/dev/null ;;
    esac
  done < <(nodes_state)
  return 1
}
wait_for "nodes ${NODES[*]} to be idle (sinfo)" all_nodes_up
wait_for "sacct" timeout 5 sacct -n -X -S now-1minutes
summary "started in $((SECONDS - t0))s"
