#!/usr/bin/env bash
# N trainer processes on this machine, joined over loopback: what a multi-host job does, without the hosts.
#   launch/local_processes.sh N DEVICES_PER_PROCESS -- --config ... --workdir ... [--config.mesh.dcn_data=N]
# On CPU each process gets DEVICES_PER_PROCESS fake devices; with GPUs, process i gets GPUs
# [i*D, (i+1)*D). Process 0 logs to the terminal, process i > 0 to <workdir>.process<i>.log.
# Ctrl-C or SIGTERM is passed on to every process (each saves a checkpoint at the same step and stops).
set -euo pipefail
cd "$(dirname "$0")/.."
n=$1; per=$2; shift 2
[ "${1:-}" = "--" ] && shift
workdir=$(printf '%s\n' "$@" | sed -n 's/^--workdir=//p')
[ -n "$workdir" ] || workdir=$(printf '%s\n' "$@" | sed -n '/^--workdir$/{n;p}')
port=$("${PYTHON:-.venv/bin/python}" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
pids=()
for ((i = 0; i < n; i++)); do
  env=(JAX_COORDINATOR_ADDRESS="127.0.0.1:$port" JAX_NUM_PROCESSES="$n" JAX_PROCESS_ID="$i")
  if command -v nvidia-smi >/dev/null 2>&1; then
    env+=(CUDA_VISIBLE_DEVICES="$(seq -s, $((i * per)) $((i * per + per - 1)))")
  else
    env+=(JAX_PLATFORMS=cpu XLA_FLAGS="--xla_force_host_platform_device_count=$per")
  fi
  if [ "$i" -eq 0 ]; then
    env "${env[@]}" "${PYTHON:-.venv/bin/python}" -m maejax.train "$@" &
  else
    env "${env[@]}" "${PYTHON:-.venv/bin/python}" -m maejax.train "$@" > "${workdir:-run}.process$i.log" 2>&1 &
  fi
  pids+=($!)
done
trap 'kill -TERM "${pids[@]}" 2>/dev/null || true' INT TERM
status=0
for pid in "${pids[@]}"; do
  # `wait` also returns when a trapped signal arrives; wait again until this process has really exited.
  while true; do
    rc=0; wait "$pid" || rc=$?
    kill -0 "$pid" 2>/dev/null || break
  done
  [ "$rc" -eq 0 ] || status=$rc
done
exit "$status"
