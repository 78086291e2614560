# Shared by start.sh and stop.sh: paths, ports and node names of the two-node test cluster, process helpers.
D=${HNCL_SLURM_DIR:-/tmp/hncl-slurm}
HOST=$(hostname -s)
CLUSTER=hncl
PARTITION=debug
# Two slurmd daemons on this host, each its own SLURM node. The names resolve (to 127.0.0.1) only inside
# the nodes' private mount namespaces, through $D/etc/hosts; each node also has its own hostname.
NODES=(hncl-n1 hncl-n2)
# Ports: slurmctld BASE, slurmdbd BASE+2, the nodes' slurmd BASE+3 and BASE+4 (6817, 6819, 6820, 6821 by
# default), so that a second cluster (another state dir and port base) can run beside this one. BASE+1 (6818,
# slurmd's default) stays free: the earlier one-node version of these scripts, run on the same state dir,
# then still starts (its stop.sh does not know the per-node slurmd).
PORT_BASE=${HNCL_SLURM_PORT_BASE:-6817}
DAEMONS=(munged mariadbd slurmdbd slurmctld "${NODES[@]/#/slurmd-}")
export SLURM_CONF=$D/etc/slurm.conf
export MYSQL_UNIX_PORT=$D/mysql/mysqld.sock

# running PID: the process exists and is not a zombie (init may reap it only seconds later).
running() {
  local stat
  stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
  stat=${stat##*) }
  [ "${stat%% *}" != Z ]
}

# alive NAME: the daemon NAME runs with the pid in the pid file this cluster gave it (pid reuse is checked;
# the slurmd of node N has the pid file slurmd-N.pid and the command name slurmd).
alive() {
  local pid
  pid=$(cat "$D/run/$1.pid" 2>/dev/null) || return 1
  [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "${1%%-*}" ] && running "$pid"
}

# nodes_state: "<node> <state>" per node of the cluster.
nodes_state() {
  timeout 5 sinfo -h -N -o "%N %T" 2>/dev/null | sort -u
}

# nodes_up: every node answers and takes jobs.
nodes_up() {
  local node state
  for node in "${NODES[@]}"; do
    state=$(nodes_state | awk -v n="$node" '$1 == n {print $2}')
    case "$state" in idle | mixed | allocated | completing) ;; *) return 1 ;; esac
  done
}

healthy() {
  local name
  for name in "${DAEMONS[@]}"; do alive "$name" || return 1; done
  nodes_up || return 1
  timeout 5 sacctmgr -n -P show cluster format=cluster 2>/dev/null | grep -qx "$CLUSTER" || return 1
  timeout 5 sacct -n -X -S now-1minutes >/dev/null 2>&1
}

summary() {
  echo "hncl-slurm: up ($1): cluster $CLUSTER, nodes ${NODES[*]} ($(sinfo -h -N -o %c | head -n1) CPUs each)," \
    "partition $PARTITION, state dir $D; clients need SLURM_CONF=$SLURM_CONF"
}
