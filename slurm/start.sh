#!/usr/bin/env bash
# Start a one-node Slurm cluster on localhost (Debian/Ubuntu packages slurm-wlm and munge).
#
#   sudo apt-get install -y slurm-wlm munge     # once
#   sudo slurm/start.sh [--clean]               # starts munged, slurmctld, slurmd; waits until idle
#                                               # (--clean: forget jobs saved by an earlier start)
#   sinfo; sbatch --wrap 'hostname'             # try it
#   sudo slurm/stop.sh
#
# State and logs go to $LMRUN_SLURM_STATE (default /var/tmp/lmrun-slurm). The config is written
# to /etc/slurm/slurm.conf (the path the Slurm commands read by default).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
state="${LMRUN_SLURM_STATE:-/var/tmp/lmrun-slurm}"
conf_dir=/etc/slurm
for cmd in munged slurmctld slurmd sinfo; do
  command -v "$cmd" >/dev/null || { echo "slurm/start.sh: $cmd not found; install Debian's slurm-wlm and munge" >&2; exit 1; }
done
[ "$(id -u)" = 0 ] || { echo "slurm/start.sh: run as root (it starts slurmd and writes $conf_dir)" >&2; exit 1; }

mkdir -p "$state/ctld" "$state/d" "$conf_dir"
host="$(hostname -s)"
cpus="$(nproc)"
mem_mb="$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 512 ))"
sed -e "s|@HOST@|$host|g" -e "s|@CPUS@|$cpus|g" -e "s|@MEMORY_MB@|$mem_mb|g" -e "s|@STATE@|$state|g" \
    -e "s|@USER@|root|g" -e "s|@CTLD_PORT@|${LMRUN_SLURMCTLD_PORT:-6817}|g" -e "s|@D_PORT@|${LMRUN_SLURMD_PORT:-6818}|g" \
    "$here/slurm.conf.template" > "$conf_dir/slurm.conf"
# Debian's slurm package reads cgroup.conf only with cgroup plugins; none are used here.

# munge: the key comes with the package; its socket directory may not exist in a container.
mkdir -p /run/munge && chown munge:munge /run/munge 2>/dev/null || true
if ! pgrep -x munged >/dev/null; then
  if [ ! -s /etc/munge/munge.key ]; then
    (command -v mungekey >/dev/null && mungekey --create) || \
      dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
    chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key
  fi
  su -s /bin/sh munge -c munged 2>/dev/null || munged --force
fi

clean=""
[ "${1:-}" = "--clean" ] && clean="-c"
pgrep -x slurmctld >/dev/null || slurmctld $clean
pgrep -x slurmd >/dev/null || slurmd

# Wait until the node accepts jobs.
for _ in $(seq 1 60); do
  state_now="$(sinfo -h -N -o '%T' 2>/dev/null | head -1 || true)"
  case "$state_now" in
    idle*|mixed*|allocated*) echo "slurm: node $host $state_now ($cpus CPUs, ${mem_mb} MB); logs in $state"; exit 0 ;;
    down*|drain*) scontrol update nodename="$host" state=resume 2>/dev/null || true ;;
  esac
  sleep 1
done
echo "slurm/start.sh: the node did not become idle; see $state/slurmctld.log and $state/slurmd.log" >&2
exit 1
