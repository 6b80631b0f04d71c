#!/usr/bin/env bash
# Runs one config on this host's GPUs (one process sees all of them), or on
# one node of a multi-node GPU job. `--help` for the options.
set -euo pipefail

PROG=$(basename "$0")
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
JAX_VERSION=0.10.2  # kept equal to setup.py's pin (a test checks)

# Multi-node: jax.distributed.initialize() reads only the coordinator address
# from the environment (JAX_COORDINATOR_ADDRESS), not the process count or id,
# and personalize_jax.main --distributed passes no arguments; so this starts
# the distributed runtime with explicit values, with cluster auto-detection
# off (under Slurm it would otherwise pin one GPU per process), then runs main.
# argv: COORDINATOR NUM_NODES NODE_RANK MAIN_ARGS...
SHIM='import runpy, sys, jax; jax.distributed.initialize(coordinator_address=sys.argv[1], num_processes=int(sys.argv[2]), process_id=int(sys.argv[3]), cluster_detection_method="deactivate"); sys.argv = ["personalize_jax.main"] + sys.argv[4:]; runpy.run_module("personalize_jax.main", run_name="__main__", alter_sys=True)'

usage() {
  cat <<EOF
Usage: $PROG --config=configs/RECIPE.py[:variant] --workdir=DIR [options] [-- --config.KEY=VALUE ...]

Runs 'python -m personalize_jax.main' on this host: one process that sees all
local GPUs (the mesh comes from the config). With --nodes=N, run the same
command on each of the N hosts with its own --node-rank; every host must see
--workdir at the same path (a shared filesystem). Arguments after '--' are
passed to personalize_jax.main unchanged (config overrides).

Options:
  --config=PATH[:VARIANT]   recipe file (required)
  --workdir=DIR             run directory (required; re-running resumes)
  --install                 first pip install this repository and
                            jax[cuda12]==$JAX_VERSION (CUDA 12 wheels from pip;
                            NVIDIA driver >= 525) into the current Python
  --cuda=12|13              CUDA major version of the jax wheels --install
                            picks (default: 12; 13 needs driver >= 580)
  --gpus=LIST               use only these GPUs (CUDA_VISIBLE_DEVICES, e.g. 0,1)
  --nodes=N                 number of hosts in the job (default: 1)
  --node-rank=R             this host's rank, 0..N-1 (default: 0); rank 0
                            runs the coordinator
  --coordinator=HOST:PORT   address of rank 0 that every host can reach
                            (required when --nodes > 1), e.g. 10.0.0.2:1234
  --python=PY               Python interpreter (default: python)
  --dry-run                 print every command, one per line; run nothing
  -h, --help                this help

Examples:
  $PROG --install --config=configs/dreambooth_tpu.py --workdir=/tmp/dog -- \\
      --config.data.instance_dir=photos/dog --config.data.class_name=dog
  # two hosts with 8 GPUs each; on host 1 the same with --node-rank=1
  $PROG --config=configs/rpo_tpu.py --workdir=/shared/rpo --nodes=2 \\
      --node-rank=0 --coordinator=10.0.0.2:1234
EOF
}

# shellcheck source=_common.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

CONFIG="" WORKDIR="" INSTALL=0 CUDA=12 GPUS="" NODES=1 RANK=0 COORDINATOR=""
PYTHON=python DRY_RUN=0
# Options override the defaults above; EXTRA gets the arguments after --.
parse_options "--config=CONFIG --workdir=WORKDIR --cuda=CUDA --gpus=GPUS
               --nodes=NODES --node-rank=RANK --coordinator=COORDINATOR
               --python=PYTHON" \
              "--install=INSTALL --dry-run=DRY_RUN" "$@"

# ------------------------------------------------------------------ checks --
[[ -n $CONFIG ]] || die "pass --config=configs/RECIPE.py[:variant]"
[[ -n $WORKDIR ]] || die "pass --workdir=DIR (the run directory)"
[[ -f ${CONFIG%%:*} ]] || die "no config file ${CONFIG%%:*}; pass --config=configs/RECIPE.py"
[[ $CUDA == 12 || $CUDA == 13 ]] || die "--cuda=$CUDA: use 12 or 13"
[[ -z $GPUS || $GPUS =~ ^[0-9]+(,[0-9]+)*$ ]] || die "--gpus=$GPUS: expected GPU indices such as 0,1,2"
[[ $NODES =~ ^[1-9][0-9]*$ ]] || die "--nodes=$NODES: expected a positive integer"
if [[ ! $RANK =~ ^[0-9]+$ ]] || (( RANK >= NODES )); then
  die "--node-rank=$RANK: expected 0..$(( NODES - 1 )) for --nodes=$NODES"
fi
if (( NODES > 1 )); then
  [[ -n $COORDINATOR ]] || die "--nodes=$NODES needs --coordinator=HOST:PORT (rank 0's address)"
  [[ $COORDINATOR =~ ^[^:[:space:]]+:[0-9]+$ || $COORDINATOR =~ ^\[[0-9a-fA-F:]+\]:[0-9]+$ ]] ||
    die "--coordinator=$COORDINATOR: expected HOST:PORT such as 10.0.0.2:1234"
elif [[ -n $COORDINATOR ]]; then
  die "--coordinator is for multi-node jobs; pass --nodes too"
fi

# ----------------------------------------------------------------- install --
if (( INSTALL )); then
  run "$PYTHON" -m pip install -e "$ROOT" "jax[cuda$CUDA]==$JAX_VERSION"
fi

# --------------------------------------------------------------------- run --
cmd=()
[[ -z $GPUS ]] || cmd+=(env CUDA_VISIBLE_DEVICES="$GPUS")
if (( NODES == 1 )); then
  cmd+=("$PYTHON" -m personalize_jax.main)
else
  cmd+=("$PYTHON" -c "$SHIM" "$COORDINATOR" "$NODES" "$RANK")
fi
cmd+=(--config="$CONFIG" --workdir="$WORKDIR" ${EXTRA[@]+"${EXTRA[@]}"})
run "${cmd[@]}"
