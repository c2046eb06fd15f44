#!/usr/bin/env bash
# Creates (or reuses) a Cloud TPU VM slice, installs offpolicy_jax on every worker, runs an
# experiment on all workers at once (one JAX process per worker host), and stops or deletes it.
#
# Usage:
#   launch/tpu_vm.sh [OPTIONS] create             create the slice, or start/reuse an existing one
#   launch/tpu_vm.sh [OPTIONS] setup              copy this checkout to every worker and
#                                                 pip install -e '.[tpu]' there into a venv
#                                                 (REMOTE_DIR/.venv, Python >= 3.11; the
#                                                 runtime image ships 3.10, so python3.11 is
#                                                 apt-installed when missing)
#   launch/tpu_vm.sh [OPTIONS] run EXPERIMENT_FILE [FLAGS...]
#                                                 run on all workers with that venv (all
#                                                 workers' output is streamed; only process 0
#                                                 prints metrics and the summary)
#   launch/tpu_vm.sh [OPTIONS] status|stop|delete stop: single-host slices only (the TPU API
#                                                 cannot stop a multi-host slice; delete it)
#
# Example (a v4-32 slice: 4 hosts x 4 chips, 16 devices):
#   launch/tpu_vm.sh --name=rl --zone=us-central2-b --accelerator-type=v4-32 create
#   launch/tpu_vm.sh --name=rl --zone=us-central2-b setup
#   launch/tpu_vm.sh --name=rl --zone=us-central2-b run experiments/topr.py \
#       --model=/home/me/Qwen2.5-7B --dataset=gsm8k --mesh=2,8,1 --dtype=bfloat16
#   launch/tpu_vm.sh --name=rl --zone=us-central2-b delete
#
# Options (or the environment variable in brackets):
#   --name=NAME                 TPU VM name [TPU_NAME, default offpolicy-jax]
#   --zone=ZONE                 zone [TPU_ZONE, default us-central2-b]
#   --accelerator-type=TYPE     slice type, create only [TPU_ACCELERATOR_TYPE, default v4-8]
#   --version=VERSION           TPU VM runtime image, create only
#                               [TPU_VERSION, default tpu-ubuntu2204-base]
#   --project=PROJECT           GCP project [TPU_PROJECT, default: gcloud's configured project]
#   --spot                      create a spot (preemptible) slice [TPU_SPOT=1]
#   --remote-dir=DIR            checkout location on the workers [TPU_REMOTE_DIR, default offpolicy_jax]
#   --dry-run                   print the gcloud commands instead of running them [DRY_RUN=1]
#
# Paths in FLAGS (--model, --workdir) are paths on the workers. Every worker must see the same
# --workdir for checkpoints (orbax writes each process's shards): use a bucket mounted at the
# same path on all workers (gcsfuse) or a shared filesystem. The experiment detects the
# multi-host launch through OFFPOLICY_JAX_DISTRIBUTED=1 (offpolicy_jax/distributed.py) and
# jax.distributed.initialize() finds the other workers from the TPU metadata.
set -euo pipefail

usage() {
  sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//' >&2
  exit 2
}

name=${TPU_NAME:-offpolicy-jax}
zone=${TPU_ZONE:-us-central2-b}
accelerator_type=${TPU_ACCELERATOR_TYPE:-v4-8}
version=${TPU_VERSION:-tpu-ubuntu2204-base}
project=${TPU_PROJECT:-}
spot=${TPU_SPOT:-0}
remote_dir=${TPU_REMOTE_DIR:-offpolicy_jax}
dry_run=${DRY_RUN:-0}

while [[ $# -gt 0 ]]; do
  case $1 in
    --name=*) name=${1#*=} ;;
    --zone=*) zone=${1#*=} ;;
    --accelerator-type=*) accelerator_type=${1#*=} ;;
    --version=*) version=${1#*=} ;;
    --project=*) project=${1#*=} ;;
    --spot) spot=1 ;;
    --remote-dir=*) remote_dir=${1#*=} ;;
    --dry-run) dry_run=1 ;;
    -h | --help) usage ;;
    --*) echo "tpu_vm.sh: unknown option $1" >&2; usage ;;
    *) break ;;
  esac
  shift
done
[[ $# -ge 1 ]] || usage
command=$1
shift

# Runs (or, with --dry-run, prints) one command.
run() {
  if [[ ${dry_run} == 1 ]]; then
    printf '%q ' "$@"
    printf '\n'
  else
    "$@"
  fi
}

common=(--zone="${zone}")
[[ -z ${project} ]] || common+=(--project="${project}")

tpu_state() {
  gcloud compute tpus tpu-vm describe "${name}" "${common[@]}" --format='value(state)' 2>/dev/null || true
}

case ${command} in
  create)
    state=""
    [[ ${dry_run} == 1 ]] || state=$(tpu_state)
    if [[ -z ${state} ]]; then
      extra=()
      [[ ${spot} != 1 ]] || extra+=(--spot)
      run gcloud compute tpus tpu-vm create "${name}" "${common[@]}" \
        --accelerator-type="${accelerator_type}" --version="${version}" "${extra[@]}"
    elif [[ ${state} == STOPPED ]]; then
      echo "tpu_vm.sh: reusing stopped TPU VM '${name}'; starting it" >&2
      run gcloud compute tpus tpu-vm start "${name}" "${common[@]}"
    elif [[ ${state} == PREEMPTED || ${state} == TERMINATED ]]; then
      # A preempted (spot) or terminated slice cannot be restarted, only deleted.
      echo "tpu_vm.sh: TPU VM '${name}' is ${state}; delete it (launch/tpu_vm.sh delete) and create it again" >&2
      exit 1
    else
      echo "tpu_vm.sh: reusing TPU VM '${name}' (state ${state})" >&2
    fi
    ;;
  setup)
    # Ship the checkout as a tarball (tracked and untracked-but-not-ignored files), unpack it on
    # every worker, install with the TPU extra.
    root=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
    tarball=$(mktemp "${TMPDIR:-/tmp}/offpolicy_jax.XXXXXX.tar.gz")
    trap 'rm -f "${tarball}"' EXIT
    git -C "${root}" ls-files --cached --others --exclude-standard -z |
      tar -C "${root}" --null -T - -czf "${tarball}"
    run gcloud compute tpus tpu-vm scp "${tarball}" "${name}:offpolicy_jax.tar.gz" \
      "${common[@]}" --worker=all
    # The package needs Python >= 3.11 (setup.py); the TPU runtime images are Ubuntu 22.04 with
    # Python 3.10, so use a newer interpreter if there is one, else apt-install python3.11. A
    # venv also keeps pip away from the system Python (PEP 668 on newer images).
    # shellcheck disable=SC2016  # expanded on the workers
    remote_setup='set -e
mkdir -p "${D}"
tar -xzf offpolicy_jax.tar.gz -C "${D}"
cd "${D}"
py=""
for candidate in python3 python3.13 python3.12 python3.11; do
  if command -v "${candidate}" >/dev/null &&
      "${candidate}" -c "import sys; sys.exit(sys.version_info < (3, 11))"; then
    py=${candidate}
    break
  fi
done
if [ -z "${py}" ]; then
  sudo apt-get -o DPkg::Lock::Timeout=600 update -q
  sudo DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -q python3.11 python3.11-venv
  py=python3.11
fi
if ! "${py}" -m venv .venv; then
  version=$("${py}" -c "import sys; print(\"%d.%d\" % sys.version_info[:2])")
  sudo DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -q "python${version}-venv"
  "${py}" -m venv .venv
fi
.venv/bin/python -m pip install --upgrade pip
.venv/bin/python -m pip install -e ".[tpu]"'
    run gcloud compute tpus tpu-vm ssh "${name}" "${common[@]}" --worker=all --command \
      "D=${remote_dir@Q}; ${remote_setup}"
    ;;
  run)
    [[ $# -ge 1 ]] || usage
    quoted=$(printf '%q ' "$@")
    # All workers start the same program; JAX connects them (OFFPOLICY_JAX_DISTRIBUTED=1).
    run gcloud compute tpus tpu-vm ssh "${name}" "${common[@]}" --worker=all --command \
      "cd ${remote_dir@Q} && OFFPOLICY_JAX_DISTRIBUTED=1 .venv/bin/python ${quoted}"
    ;;
  status)
    run gcloud compute tpus tpu-vm describe "${name}" "${common[@]}"
    ;;
  stop)
    run gcloud compute tpus tpu-vm stop "${name}" "${common[@]}"
    ;;
  delete)
    run gcloud compute tpus tpu-vm delete "${name}" "${common[@]}" --quiet
    ;;
  *)
    echo "tpu_vm.sh: unknown command '${command}'" >&2
    usage
    ;;
esac
