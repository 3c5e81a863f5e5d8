#!/usr/bin/env bash
# Stop the one-node cluster started by slurm/start.sh (jobs still queued are lost).
set -uo pipefail
for d in slurmd slurmctld; do pkill -x "$d" 2>/dev/null; done
for _ in $(seq 1 20); do { pgrep -x slurmd || pgrep -x slurmctld; } >/dev/null || break; sleep 0.5; done
echo "slurm: stopped (munged left running)"
