#!/usr/bin/env bash
# Creates a Cloud TPU VM (one host or a pod slice), installs personalize_jax on
# every worker, runs one config on all workers at once, copies the workdir
# back and optionally deletes the VM. `--help` for the options.
set -euo pipefail

PROG=$(basename "$0")
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# Kept equal to setup.py's pin (a test checks); the package's `tpu` extra
# pins the libtpu this jax release declares.
JAX_VERSION=0.10.2
# jax 0.10 needs Python >= 3.11; the TPU images ship Ubuntu 22.04's 3.10, so uv
# brings its own interpreter into the venv.
PYTHON_VERSION=3.11
REMOTE_DIR=personalize_jax  # the checkout on each worker, relative to $HOME
GCS_MOUNT=/tmp/gcs  # a gs:// workdir's bucket is mounted at $GCS_MOUNT/<bucket>

usage() {
  cat <<EOF
Usage: $PROG --config=configs/RECIPE.py[:variant] [options] [-- --config.KEY=VALUE ...]

Creates a Cloud TPU VM, installs this package on every worker, runs
'python -m personalize_jax.main' on all workers at once (with --distributed
when the slice has more than one host), copies the workdir back from worker 0
and, with --delete-after, deletes the VM. Arguments after '--' are passed to
personalize_jax.main unchanged (config overrides).

Options:
  --config=PATH[:VARIANT]   recipe, a path inside the repository (required)
  --name=NAME               TPU VM name (default: personalize-jax)
  --accelerator-type=TYPE   v4-8 (default; one host), v4-32 and up (pods),
                            v5litepod-1/4/8 (v5e host), v5litepod-16 and up,
                            v5p-8..., v6e-8..., v2-8, v3-8
  --zone=ZONE               zone (default: us-central2-b for v4; required for
                            the other families)
  --project=PROJECT         Cloud project (default: gcloud's configured one)
  --runtime-version=VER     TPU software version (default per family: v2/v3/v4
                            tpu-ubuntu2204-base, v5litepod v2-alpha-tpuv5-lite,
                            v5p v2-alpha-tpuv5, v6e v2-alpha-tpuv6e)
  --spot                    create a Spot VM (cheaper, can be preempted; re-run
                            with --skip-create --skip-setup to resume)
  --repo=URL                git clone URL/branch on the workers instead of
                            copying the local tree (the default: tracked and
                            untracked, not ignored, files of $ROOT)
  --branch=BRANCH           branch or tag of --repo (default: main)
  --workdir=DIR             run directory on the workers (default:
                            runs/<recipe name>, inside ~/$REMOTE_DIR). For pods
                            use gs://BUCKET/PATH: it is mounted with gcsfuse at
                            $GCS_MOUNT/BUCKET on every worker, so all hosts share
                            one directory (checkpoints need that)
  --copy-to=DIR             local folder the workdir is copied into from worker
                            0 (default: tpu_runs/NAME; skipped for gs://)
  --skip-create             use an existing VM of that name
  --skip-setup              do not reinstall (the workers are set up already)
  --delete-after            delete the VM at the end, also when the run failed
  --dry-run                 print every command, one per line; run nothing
  -h, --help                this help

Example:
  $PROG --config=configs/rpo_tpu.py --accelerator-type=v4-32 \\
      --workdir=gs://my-bucket/rpo-dog --delete-after -- \\
      --config.data.instance_dir=photos/dog --config.data.class_name=dog
EOF
}

# shellcheck source=_common.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

CONFIG="" NAME=personalize-jax ACCEL=v4-8 ZONE="" PROJECT="" RUNTIME=""
SPOT=0 REPO="" BRANCH=main WORKDIR="" COPY_TO="" SKIP_CREATE=0 SKIP_SETUP=0
DELETE_AFTER=0 DRY_RUN=0
# Options override the defaults above; EXTRA gets the arguments after --.
parse_options "--config=CONFIG --name=NAME --accelerator-type=ACCEL --zone=ZONE
               --project=PROJECT --runtime-version=RUNTIME --repo=REPO
               --branch=BRANCH --workdir=WORKDIR --copy-to=COPY_TO" \
              "--spot=SPOT --skip-create=SKIP_CREATE --skip-setup=SKIP_SETUP
               --delete-after=DELETE_AFTER --dry-run=DRY_RUN" "$@"

# ------------------------------------------------------------------ checks --
[[ -n $CONFIG ]] || die "pass --config=configs/RECIPE.py[:variant]"
config_file=${CONFIG%%:*}
[[ $config_file != /* ]] || die "--config must be a path inside the repository (configs/...), not $config_file"
if [[ -z $REPO && ! -f $ROOT/$config_file ]]; then
  die "no config file $ROOT/$config_file; pass --config=configs/RECIPE.py"
fi
[[ $NAME =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] ||
  die "--name=$NAME: use lowercase letters, digits and hyphens, starting with a letter"
[[ $ACCEL =~ ^(v[0-9]+[a-z]*|v5litepod)-([0-9]+)$ ]] ||
  die "--accelerator-type=$ACCEL: expected FAMILY-SIZE such as v4-8, v4-32, v5litepod-16"
family=${BASH_REMATCH[1]} size=${BASH_REMATCH[2]}
case $family in
  v2|v3|v4) default_runtime="tpu-ubuntu2204-base";;
  v5litepod|v5e) default_runtime="v2-alpha-tpuv5-lite";;
  v5p) default_runtime="v2-alpha-tpuv5";;
  v6e) default_runtime="v2-alpha-tpuv6e";;
  *) default_runtime="";;
esac
if [[ -z $RUNTIME ]]; then
  [[ -n $default_runtime ]] ||
    die "no default software version for $ACCEL; pass --runtime-version"
  RUNTIME=$default_runtime
fi
if [[ -z $ZONE ]]; then
  [[ $family == v4 ]] || die "pass --zone for $ACCEL (v4 defaults to us-central2-b)"
  ZONE=us-central2-b
fi
# v2/v3/v4/v5p sizes count TensorCores, 8 per host; v5e/v6e sizes count chips:
# up to 8 on one host, 4 per host beyond that.
case $family in
  v5litepod|v5e|v6e) if (( size <= 8 )); then hosts=1; else hosts=$(( size / 4 )); fi;;
  *) hosts=$(( size > 8 ? size / 8 : 1 ));;
esac

recipe=$(basename "$config_file" .py)
[[ -n $WORKDIR ]] || WORKDIR=runs/$recipe
[[ -n $COPY_TO ]] || COPY_TO=tpu_runs/$NAME
if [[ $WORKDIR == gs://* ]]; then
  gcs_path=${WORKDIR#gs://}
  bucket=${gcs_path%%/*}
  [[ -n $bucket && $gcs_path == */?* ]] ||
    die "--workdir=$WORKDIR: expected gs://BUCKET/PATH"
  remote_workdir=$GCS_MOUNT/$gcs_path
elif (( hosts > 1 )); then
  bucket=""
  remote_workdir=$WORKDIR
  printf '%s: warning: %s has %d hosts and --workdir=%s is on each host'"'"'s own disk; checkpoints need one shared directory: pass --workdir=gs://BUCKET/PATH\n' \
    "$PROG" "$ACCEL" "$hosts" "$WORKDIR" >&2
else
  bucket=""
  remote_workdir=$WORKDIR
fi

where=(--zone="$ZONE")
[[ -z $PROJECT ]] || where+=(--project="$PROJECT")
tpu=(gcloud compute tpus tpu-vm)

# With --delete-after the VM goes whatever happens from here on, a failed
# setup included, so it never keeps running unattended.
# shellcheck disable=SC2317  # reached through the trap
delete_vm() {
  local rc=$?
  run "${tpu[@]}" delete "$NAME" "${where[@]}" --quiet || rc=$?
  exit "$rc"
}
(( ! DELETE_AFTER )) || trap delete_vm EXIT

# ------------------------------------------------------------------ create --
if (( ! SKIP_CREATE )); then
  create=("${tpu[@]}" create "$NAME" --accelerator-type="$ACCEL"
          --version="$RUNTIME" "${where[@]}")
  (( ! SPOT )) || create+=(--spot)
  run "${create[@]}"
fi

# ------------------------------------------------------------------- setup --
# Each worker gets the code in ~/$REMOTE_DIR and a venv in ~/$REMOTE_DIR/.venv.
if (( ! SKIP_SETUP )); then
  if [[ -n $REPO ]]; then
    fetch="if [ -d $REMOTE_DIR/.git ]; then git -C $REMOTE_DIR fetch -q origin $(quote "$BRANCH") && git -C $REMOTE_DIR checkout -q --force FETCH_HEAD; else git clone -q --branch $(quote "$BRANCH") $(quote "$REPO") $REMOTE_DIR; fi"
  else
    tarball=${TMPDIR:-/tmp}/personalize_jax-src-$NAME.tar.gz
    run_shell "git -C $(quote "$ROOT") ls-files -z --cached --others --exclude-standard | tar -czf $(quote "$tarball") -C $(quote "$ROOT") --null -T -"
    run "${tpu[@]}" scp "$tarball" "$NAME:personalize_jax-src.tar.gz" --worker=all "${where[@]}"
    fetch="mkdir -p $REMOTE_DIR && tar -xzf personalize_jax-src.tar.gz -C $REMOTE_DIR"
  fi
  setup="set -e; export PATH=\"\$HOME/.local/bin:\$PATH\"; command -v uv >/dev/null || curl -LsSf https://astral.sh/uv/install.sh | sh; $fetch; uv venv -q --allow-existing --python $PYTHON_VERSION $REMOTE_DIR/.venv; uv pip install -q --python $REMOTE_DIR/.venv/bin/python -e \"./${REMOTE_DIR}[tpu]\" jax==$JAX_VERSION"
  if [[ -n $bucket ]]; then
    setup+="; command -v gcsfuse >/dev/null || { echo \"deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt gcsfuse-\$(lsb_release -cs) main\" | sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null && curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null && sudo apt-get update -q && sudo apt-get install -y -q gcsfuse; }"
  fi
  run "${tpu[@]}" ssh "$NAME" --worker=all "${where[@]}" --command="$setup"
fi

# --------------------------------------------------------------------- run --
# All workers start the same command; with more than one host,
# jax.distributed.initialize() finds the others through the TPU metadata.
train=(.venv/bin/python -m personalize_jax.main --config="$CONFIG"
       --workdir="$remote_workdir")
(( hosts == 1 )) || train+=(--distributed)
train+=(${EXTRA[@]+"${EXTRA[@]}"})
remote="cd $REMOTE_DIR && "
if [[ -n $bucket ]]; then
  remote+="mkdir -p $GCS_MOUNT/$bucket && { mountpoint -q $GCS_MOUNT/$bucket || gcsfuse --implicit-dirs $(quote "$bucket") $GCS_MOUNT/$bucket; } && "
fi
remote+=$(quote "${train[@]}")
status=0
run "${tpu[@]}" ssh "$NAME" --worker=all "${where[@]}" --command="$remote" || status=$?

# -------------------------------------------------------------------- copy --
# Also after a failed run: its logs, metrics and checkpoints are worth having.
if [[ -z $bucket ]]; then
  if [[ $remote_workdir == /* ]]; then source=$remote_workdir
  else source=$REMOTE_DIR/$remote_workdir; fi
  run mkdir -p "$COPY_TO" || status=$?
  run "${tpu[@]}" scp --recurse "$NAME:$source" "$COPY_TO" --worker=0 "${where[@]}" ||
    status=$?
fi
if (( ! DRY_RUN )); then
  if [[ -n $bucket ]]; then where_now=$WORKDIR
  else where_now=$COPY_TO/$(basename "$remote_workdir"); fi
  if (( status == 0 )); then
    printf '%s: done; the run is in %s\n' "$PROG" "$where_now" >&2
  else
    printf '%s: error: a step failed (exit %d); what was copied is in %s\n' \
      "$PROG" "$status" "$where_now" >&2
  fi
fi
exit "$status"
