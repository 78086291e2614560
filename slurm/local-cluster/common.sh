# Shared by start.sh and stop.sh: paths of the one-node test cluster and small process helpers.
D=${HNCL_SLURM_DIR:-/tmp/hncl-slurm}
HOST=$(hostname -s)
CLUSTER=hncl
PARTITION=debug
DAEMONS=(munged mariadbd slurmdbd slurmctld slurmd)
export SLURM_CONF=$D/etc/slurm.conf
export MYSQL_UNIX_PORT=$D/mysql/mysqld.sock

# running PID: the process exists and is not a zombie (init may reap it only seconds later).
running() {
  local stat
  stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
  stat=${stat##*) }
  [ "${stat%% *}" != Z ]
}

# alive NAME: the daemon NAME runs with the pid in the pid file this cluster gave it (pid reuse is checked).
alive() {
  local pid
  pid=$(cat "$D/run/$1.pid" 2>/dev/null) || return 1
  [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$1" ] && running "$pid"
}

node_state() {
  timeout 5 sinfo -h -N -n "$HOST" -o %T 2>/dev/null | head -n1
}

healthy() {
  local name
  for name in "${DAEMONS[@]}"; do alive "$name" || return 1; done
  case "$(node_state)" in idle | mixed | allocated | completing) ;; *) return 1 ;; esac
  timeout 5 sacctmgr -n -P show cluster format=cluster 2>/dev/null | grep -qx "$CLUSTER" || return 1
  timeout 5 sacct -n -X -S now-1minutes >/dev/null 2>&1
}

summary() {
  echo "hncl-slurm: up ($1): cluster $CLUSTER, node $HOST, partition $PARTITION," \
    "$(sinfo -h -N -n "$HOST" -o %c) CPUs, state dir $D; clients need SLURM_CONF=$SLURM_CONF"
}
