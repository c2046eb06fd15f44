#!/usr/bin/env bash
#SBATCH --job-name=offpolicy_jax
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
#SBATCH --output=slurm-%x-%j.out
#
# Runs one experiment on N nodes x G GPUs as one multi-controller JAX program.
#
# Usage (the #SBATCH lines above are defaults; sbatch options override them):
#   sbatch launch/gpu_slurm.sh EXPERIMENT_FILE [FLAGS...]
#   sbatch --nodes=4 --gpus-per-node=8 launch/gpu_slurm.sh experiments/topr.py \
#       --model=/checkpoints/Llama-3.1-8B --dataset=gsm8k --mesh=16,2,1 --dtype=bfloat16
#
# Layout: one JAX process per node, owning all of that node's GPUs (fewer processes, and
# intra-node collectives stay inside one process's NCCL communicator). Inside a SLURM step JAX
# would otherwise assume one process per GPU and give each process only GPU SLURM_LOCALID, so
# every task exports JAX_LOCAL_DEVICE_IDS=0,...,G-1 (its G visible GPUs) before starting.
# The global mesh spans nodes x GPUs devices; --mesh=-1 or explicit sizes as in the README.
#
# Derived from SLURM: the coordinator is the first host of SLURM_JOB_NODELIST (port
# COORDINATOR_PORT, default 61440 + job id mod 4096), the process count is the number of nodes,
# and each task's process id is its SLURM_PROCID; they reach the experiment as
# JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID (see offpolicy_jax/distributed.py).
# The job's --cpus-per-task is passed on to the step (srun stopped inheriting it in Slurm 22.05).
#
# Environment:
#   PYTHON               interpreter with offpolicy_jax[gpu] installed (default python3)
#   SETUP_SCRIPT         optional file sourced on every node first (e.g. a venv's bin/activate)
#   COORDINATOR_PORT     coordinator TCP port
set -euo pipefail

usage() {
  sed -n '/^# Runs one experiment/,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//' >&2
  exit 2
}

[[ $# -ge 1 ]] || usage
experiment=$1
shift
if [[ -z ${SLURM_JOB_ID:-} ]]; then
  echo "gpu_slurm.sh: not inside a SLURM job; submit it with sbatch" >&2
  usage
fi
if [[ ! -f ${experiment} ]]; then
  echo "gpu_slurm.sh: experiment file '${experiment}' does not exist (paths are relative to the submit directory ${SLURM_SUBMIT_DIR:-.})" >&2
  exit 2
fi

# sed, not head: head exits after one line and, under pipefail, a SIGPIPE of scontrol (long
# node lists) would end the script with status 141 and no message.
coordinator_host=$(scontrol show hostnames "${SLURM_JOB_NODELIST:-}" | sed -n 1p)
if [[ -z ${coordinator_host} ]]; then
  echo "gpu_slurm.sh: no host in SLURM_JOB_NODELIST='${SLURM_JOB_NODELIST:-}'" >&2
  exit 1
fi
coordinator_port=${COORDINATOR_PORT:-$((61440 + SLURM_JOB_ID % 4096))}
num_processes=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}

export JAX_COORDINATOR_ADDRESS="${coordinator_host}:${coordinator_port}"
export JAX_NUM_PROCESSES="${num_processes}"
export PYTHON="${PYTHON:-python3}"
export SETUP_SCRIPT="${SETUP_SCRIPT:-}"
# XLA's GPU allocator defaults to 75% of memory; the sampler's KV cache and the train state
# share the device, so let JAX use most of it.
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}"
# Since Slurm 22.05 srun does not inherit the job's --cpus-per-task: without this the process
# (and its verifier worker pool) would be confined to one core.
if [[ -n ${SLURM_CPUS_PER_TASK:-} ]]; then
  export SRUN_CPUS_PER_TASK="${SRUN_CPUS_PER_TASK:-${SLURM_CPUS_PER_TASK}}"
fi

echo "gpu_slurm.sh: ${num_processes} process(es) (one per node), coordinator ${JAX_COORDINATOR_ADDRESS}" >&2

# shellcheck disable=SC2016  # the single-quoted script expands on the node, not here
# One task per node; each task learns its process id from SLURM_PROCID inside the step.
# --kill-on-bad-exit: one failed process ends the whole step instead of leaving the rest blocked
# in a collective.
srun --nodes="${num_processes}" --ntasks="${num_processes}" --ntasks-per-node=1 \
  --kill-on-bad-exit=1 \
  bash -c '
    set -euo pipefail
    if [[ -n ${SETUP_SCRIPT} ]]; then
      # Activation scripts (conda, environment modules) often read unset variables.
      set +u
      # shellcheck disable=SC1090
      source "${SETUP_SCRIPT}"
      set -u
    fi
    export JAX_PROCESS_ID="${SLURM_PROCID}"
    # All GPUs of this node belong to this one process (the SLURM detection of JAX would
    # otherwise hand it only GPU SLURM_LOCALID = 0).
    if [[ -z ${JAX_LOCAL_DEVICE_IDS:-} ]]; then
      num_gpus=0
      if [[ -n ${CUDA_VISIBLE_DEVICES:-} && ${CUDA_VISIBLE_DEVICES} != NoDevFiles ]]; then
        IFS=, read -r -a visible <<<"${CUDA_VISIBLE_DEVICES}"
        num_gpus=${#visible[@]}
      elif [[ ${SLURM_GPUS_ON_NODE:-} =~ ^[0-9]+$ ]]; then
        num_gpus=${SLURM_GPUS_ON_NODE}
      fi
      if [[ ${num_gpus} -gt 0 ]]; then
        JAX_LOCAL_DEVICE_IDS=$(seq -s, 0 $((num_gpus - 1)))
        export JAX_LOCAL_DEVICE_IDS
      else
        echo "gpu_slurm.sh: $(hostname): no GPUs visible (CUDA_VISIBLE_DEVICES and SLURM_GPUS_ON_NODE unset)" >&2
      fi
    fi
    exec "${PYTHON}" "$@"
  ' gpu_slurm_task "${experiment}" "$@"
