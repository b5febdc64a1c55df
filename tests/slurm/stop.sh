#!/usr/bin/env bash
# Stops exactly the daemons tests/slurm/start.sh started (their pids are in $CB_SLURM_DIR/pids), newest
# first, after cancelling the jobs still on that cluster. Safe to run twice; the state folder stays for
# its logs and is wiped by the next start.
set -uo pipefail

STATE=${CB_SLURM_DIR:-/tmp/conceptbench-slurm}
PIDS=$STATE/pids
[ -s "$PIDS" ] || { echo "stop.sh: no cluster recorded in $PIDS" >&2; exit 0; }
export SLURM_CONF=$STATE/etc/slurm.conf

# alive NAME PID: the pid still runs the program start.sh gave it (not a recycled pid).
alive() { [ "$(cat "/proc/$2/comm" 2>/dev/null)" = "$1" ]; }

# Jobs left running would outlive slurmd (their slurmstepd is not its child): cancel them first.
if grep -q '^slurmctld ' "$PIDS" && alive slurmctld "$(awk '$1 == "slurmctld" {print $2}' "$PIDS")"; then
  scancel --user="$(id -un)" 2>/dev/null || true
  for _ in $(seq 50); do
    [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break
    sleep 0.2
  done
fi

tac "$PIDS" | while read -r name pid; do
  if [ "$name" = link ]; then  # the default-path link to this cluster's slurm.conf
    [ "$(readlink "$pid")" = "$SLURM_CONF" ] && rm -f "$pid"
    continue
  fi
  alive "$name" "$pid" || continue
  kill -TERM "$pid"
  for _ in $(seq 100); do
    alive "$name" "$pid" || break
    sleep 0.1
  done
  if alive "$name" "$pid"; then
    echo "stop.sh: $name ($pid) ignored SIGTERM for 10 s; killing it" >&2
    kill -KILL "$pid"
  fi
done
: >"$PIDS"
echo "stop.sh: stopped the cluster in $STATE" >&2
