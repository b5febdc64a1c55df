#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for tests: munged, MariaDB, slurmdbd, slurmctld and slurmd,
# started as root without systemd, each on its own socket or port, with all state in one folder.
#
#   tests/slurm/start.sh            # prints `export SLURM_CONF=...`; eval it to use sbatch, sacct, snakemake
#   tests/slurm/stop.sh             # stops exactly the daemons this script started
#
# The node is written from `slurmd -C` and advertises GPUs that are not there (Gres=gpu:<model>:2 on
# /dev/null and /dev/zero), so `--gpus=1` and `--gpus=<model>:1` schedule and the job sees
# CUDA_VISIBLE_DEVICES. Accounting goes through slurmdbd, because the Snakemake plugin polls with sacct.
# Settings (environment): CB_SLURM_DIR (state, default /tmp/conceptbench-slurm), CB_SLURM_GPU_MODEL (h100),
# CB_SLURM_PORT_BASE (16817: slurmctld, +1 slurmd, +2 slurmdbd, +3 MariaDB).
set -euo pipefail

[ "$(id -u)" = 0 ] || { echo "start.sh: run as root (it starts munged, MariaDB and the SLURM daemons)" >&2; exit 1; }
STATE=${CB_SLURM_DIR:-/tmp/conceptbench-slurm}
MODEL=${CB_SLURM_GPU_MODEL:-h100}
BASE=${CB_SLURM_PORT_BASE:-16817}
CTLD_PORT=$BASE SLURMD_PORT=$((BASE + 1)) DBD_PORT=$((BASE + 2)) DB_PORT=$((BASE + 3))
PIDS=$STATE/pids

if [ -s "$PIDS" ]; then
  echo "start.sh: $PIDS exists: a cluster from this folder may still run; run tests/slurm/stop.sh first" >&2
  exit 1
fi

# Debian's packages (bookworm: SLURM 22.05, MariaDB 10.11, MUNGE 0.5).
need=()
for pair in slurmctld:slurmctld slurmd:slurmd sbatch:slurm-client munged:munge slurmdbd:slurmdbd mariadbd:mariadb-server; do
  command -v "${pair%%:*}" >/dev/null || need+=("${pair#*:}")
done
if [ ${#need[@]} -gt 0 ]; then
  echo "start.sh: installing ${need[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2
  apt-get install -y -qq --no-install-recommends "${need[@]}" >&2
fi

rm -rf "$STATE"
mkdir -p "$STATE"/{etc,log,run,ctld,slurmd,munge,mysql}
chmod 755 "$STATE" "$STATE"/run
chmod 700 "$STATE"/munge
ETC=$STATE/etc LOG=$STATE/log RUN=$STATE/run
: >"$PIDS"

# start NAME COMMAND...: run a daemon in the foreground, in its own session, and record its pid.
start() {
  local name=$1
  shift
  setsid "$@" </dev/null >>"$LOG/$name.out" 2>&1 &
  echo "$name $!" >>"$PIDS"
}

# wait_for WHAT COMMAND...: retry COMMAND for up to 30 s.
wait_for() {
  local what=$1
  shift
  for _ in $(seq 150); do
    timeout 5 "$@" >/dev/null 2>&1 && return 0
    sleep 0.2
  done
  echo "start.sh: $what did not come up; logs in $LOG:" >&2
  tail -n 20 "$LOG"/* >&2 || true
  exit 1
}

# MUNGE: a fresh key and a private socket.
mungekey --create --keyfile="$STATE/munge/munge.key" --force
start munged munged --foreground --force --socket="$RUN/munge.socket" --key-file="$STATE/munge/munge.key" \
  --pid-file="$RUN/munged.pid" --log-file="$LOG/munged.log" --seed-file="$STATE/munge/munged.seed"
wait_for munged test -S "$RUN/munge.socket"

# MariaDB: a private data folder, socket and port; root without a password, local only.
mariadb-install-db --no-defaults --datadir="$STATE/mysql" --user=root --auth-root-authentication-method=normal \
  --skip-test-db >"$LOG/mariadb-install.log" 2>&1
start mariadbd mariadbd --no-defaults --datadir="$STATE/mysql" --socket="$RUN/mysql.sock" --port="$DB_PORT" \
  --bind-address=127.0.0.1 --user=root --pid-file="$RUN/mariadbd.pid" --log-error="$LOG/mariadbd.log" \
  --skip-log-bin --innodb-buffer-pool-size=64M
wait_for MariaDB mariadb --no-defaults --socket="$RUN/mysql.sock" -uroot -e "SELECT 1"

HOST=$(hostname -s)
# slurmd -C: NodeName=<host> CPUs=... RealMemory=... (its first line).
NODE=$(slurmd -C | head -n 1)

cat >"$ETC/slurm.conf" <<EOF
# Written by tests/slurm/start.sh: one node, this machine.
ClusterName=conceptbench
SlurmctldHost=$HOST(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$RUN/munge.socket
CredType=cred/munge
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/slurmd
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
ReturnToService=2
MailProg=/bin/true
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# Without a default, a job without --mem takes the whole node's memory.
DefMemPerCPU=1000
# Finished jobs stay visible to squeue for 5 minutes (the plugin's fallback status command).
MinJobAge=300
KillWait=10
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=$DBD_PORT
# The munge socket for talking to slurmdbd (AuthInfo above covers the rest).
AccountingStoragePass=$RUN/munge.socket
# sacct shows each job's GPUs and Snakemake's comment (the rule or group it ran).
AccountingStorageTRES=gres/gpu
AccountingStoreFlags=job_comment
JobAcctGatherType=jobacct_gather/linux
JobCompType=jobcomp/none
GresTypes=gpu
$NODE NodeAddr=127.0.0.1 Gres=gpu:$MODEL:2 State=UNKNOWN
PartitionName=main Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF

# GPUs that are not there: each needs a character device as its File=, or slurmd drops it.
cat >"$ETC/gres.conf" <<EOF
Name=gpu Type=$MODEL File=/dev/null
Name=gpu Type=$MODEL File=/dev/zero
EOF

cat >"$ETC/slurmdbd.conf" <<EOF
AuthType=auth/munge
AuthInfo=socket=$RUN/munge.socket
DbdHost=localhost
DbdPort=$DBD_PORT
SlurmUser=root
LogFile=$LOG/slurmdbd.log
PidFile=$RUN/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=root
StorageLoc=slurm_acct_db
EOF
chmod 600 "$ETC/slurmdbd.conf"

# Jobs see the cluster through the default path: the Snakemake job step drops SLURM_CONF before its srun.
DEFAULT_CONF=/etc/slurm/slurm.conf
if [ -e "$DEFAULT_CONF" ] || [ -L "$DEFAULT_CONF" ]; then
  echo "start.sh: $DEFAULT_CONF exists (another cluster's config?); not replacing it" >&2
  exit 1
fi
mkdir -p /etc/slurm
ln -s "$ETC/slurm.conf" "$DEFAULT_CONF"
echo "link $DEFAULT_CONF" >>"$PIDS"

export SLURM_CONF=$ETC/slurm.conf
start slurmdbd slurmdbd -D
wait_for slurmdbd sacctmgr -i show cluster
start slurmctld slurmctld -D -i
wait_for slurmctld scontrol ping
start slurmd slurmd -D
wait_for "the node" bash -c "sinfo -h -N -o %T | grep -qx idle"
# slurmctld registers the cluster with slurmdbd on its own; sacct answers once it has.
wait_for accounting bash -c "sacctmgr -n -P show cluster format=cluster | grep -qx conceptbench"

echo "export SLURM_CONF=$SLURM_CONF"
