#!/usr/bin/env bash
# Runs one experiment as NUM_PROCESSES JAX processes on this machine (multi-controller JAX on CPU).
#
# The processes find each other through a coordinator on 127.0.0.1 (process 0) and together form
# one global device mesh, exactly as the hosts of a TPU slice or a GPU cluster do; this is how the
# multi-process code paths are tested without a cluster.
#
# Usage:
#   launch/local.sh NUM_PROCESSES EXPERIMENT_FILE [FLAGS...]
#   launch/local.sh 2 experiments/topr.py --mesh=1,-1,1 --iterations=4
#
# Environment:
#   LOCAL_DEVICES_PER_PROCESS  fake CPU devices per process (default 2), i.e.
#                              --xla_force_host_platform_device_count
#   LOCAL_LOG_DIR              where process_<i>.log are written (default: a new temporary dir)
#   LOCAL_JAX_PLATFORMS        JAX_PLATFORMS for the processes (default cpu)
#   PYTHON                     interpreter (default python3)
#
# Process 0's output is also shown on this terminal (its last line is the run's JSON summary).
# The script exits with the first non-zero exit status of any process, and on any failure,
# Ctrl-C or termination it stops every process it started (each runs in its own process group,
# so the verifier workers they spawned stop with them).
set -euo pipefail

usage() {
  sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//' >&2
  exit 2
}

[[ $# -ge 2 ]] || usage
num_processes=$1
experiment=$2
shift 2
if ! [[ ${num_processes} =~ ^[1-9][0-9]*$ ]]; then
  echo "local.sh: NUM_PROCESSES must be a positive integer, got '${num_processes}'" >&2
  usage
fi
if [[ ! -f ${experiment} ]]; then
  echo "local.sh: experiment file '${experiment}' does not exist" >&2
  exit 2
fi

python=${PYTHON:-python3}
devices_per_process=${LOCAL_DEVICES_PER_PROCESS:-2}
if ! [[ ${devices_per_process} =~ ^[1-9][0-9]*$ ]]; then
  echo "local.sh: LOCAL_DEVICES_PER_PROCESS must be a positive integer" >&2
  exit 2
fi
log_dir=${LOCAL_LOG_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/offpolicy_jax_local.XXXXXX")}
mkdir -p "${log_dir}"

# A free TCP port for the coordinator (the OS picks it; released just before process 0 binds it).
port=$("${python}" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')

# Drop any device-count flag inherited from the caller, then set ours.
xla_flags=$(sed -E 's/--xla_force_host_platform_device_count=[^ ]*//g' <<<"${XLA_FLAGS:-}")
xla_flags="${xla_flags} --xla_force_host_platform_device_count=${devices_per_process}"

pids=()
stopping=0

stop_all() {
  # SIGTERM every process group we started, give them a moment, then SIGKILL what is left.
  stopping=1
  local pid
  for pid in "${pids[@]}"; do
    kill -TERM -- "-${pid}" 2>/dev/null || true
  done
  for _ in $(seq 50); do
    local alive=0
    for pid in "${pids[@]}"; do
      if kill -0 -- "-${pid}" 2>/dev/null; then alive=1; fi
    done
    [[ ${alive} -eq 1 ]] || return 0
    sleep 0.1
  done
  for pid in "${pids[@]}"; do
    kill -KILL -- "-${pid}" 2>/dev/null || true
  done
}

on_signal() {
  echo "local.sh: interrupted; stopping ${#pids[@]} process(es)" >&2
  stop_all
  exit 130
}
trap on_signal INT TERM
trap '[[ ${stopping} -eq 1 ]] || stop_all' EXIT

echo "local.sh: ${num_processes} process(es) x ${devices_per_process} CPU device(s), coordinator 127.0.0.1:${port}, logs in ${log_dir}" >&2
for ((i = 0; i < num_processes; i++)); do
  log="${log_dir}/process_${i}.log"
  # setsid: each process leads its own process group, so stop_all reaches its children too.
  if [[ ${i} -eq 0 ]]; then
    JAX_COORDINATOR_ADDRESS="127.0.0.1:${port}" JAX_NUM_PROCESSES="${num_processes}" \
      JAX_PROCESS_ID="${i}" JAX_PLATFORMS="${LOCAL_JAX_PLATFORMS:-cpu}" XLA_FLAGS="${xla_flags}" \
      setsid "${python}" "${experiment}" "$@" > >(tee "${log}") 2>&1 &
  else
    JAX_COORDINATOR_ADDRESS="127.0.0.1:${port}" JAX_NUM_PROCESSES="${num_processes}" \
      JAX_PROCESS_ID="${i}" JAX_PLATFORMS="${LOCAL_JAX_PLATFORMS:-cpu}" XLA_FLAGS="${xla_flags}" \
      setsid "${python}" "${experiment}" "$@" >"${log}" 2>&1 &
  fi
  pids+=("$!")
done

# Poll rather than `wait`: the first process to fail must bring the others down at once (they
# would otherwise block in a collective until JAX's heartbeat timeout).
remaining=${num_processes}
declare -A finished=()
while [[ ${remaining} -gt 0 ]]; do
  for i in "${!pids[@]}"; do
    pid=${pids[${i}]}
    [[ -z ${finished[${i}]+x} ]] || continue
    if ! kill -0 "${pid}" 2>/dev/null; then
      status=0
      wait "${pid}" || status=$?
      finished[${i}]=${status}
      remaining=$((remaining - 1))
      if [[ ${status} -ne 0 ]]; then
        echo "local.sh: process ${i} (pid ${pid}) exited with status ${status}; stopping the others. Its log: ${log_dir}/process_${i}.log" >&2
        tail -n 20 "${log_dir}/process_${i}.log" >&2 || true
        stop_all
        exit "${status}"
      fi
    fi
  done
  [[ ${remaining} -eq 0 ]] || sleep 0.2
done
# Let tee flush process 0's last lines before returning.
wait
echo "local.sh: all ${num_processes} process(es) finished" >&2
