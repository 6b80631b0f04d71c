#!/usr/bin/env bash
# Trains one model per DreamBench subject with one recipe, then evaluates them
# all (DINO, CLIP-I, CLIP-T, H(lambda)). `--help` for the options.
set -euo pipefail

PROG=$(basename "$0")
CLASSES_FILE=prompts_and_classes.txt

usage() {
  cat <<EOF
Usage: $PROG --config=configs/RECIPE.py[:variant] --dataset-dir=DIR --out=DIR [options] [-- --config.KEY=VALUE ...]

For each subject: python -m personalize_jax.main --config=RECIPE
--workdir=OUT/SUBJECT --config.data.instance_dir=DATASET/SUBJECT
--config.data.class_name=CLASS (the class noun from DATASET/$CLASSES_FILE)
--config.final_eval.enabled=false (the sweep's evaluation replaces it),
then links OUT/models/SUBJECT -> ../SUBJECT/export (each run's fine-tuned
pipeline, or its LoRA with a :lora recipe) and runs python -m
personalize_jax.evaluate with --config.model=OUT/models, which samples each
subject from its own pipeline (base + that subject's LoRA for LoRA runs).
The metrics table is written to OUT/eval/metrics.md (and metrics.json,
grids/). Re-running resumes unfinished runs from their checkpoints. Arguments
after '--' are passed to every training run unchanged.

Options:
  --config=PATH[:VARIANT]     training recipe (required)
  --dataset-dir=DIR           the DreamBooth dataset: one folder of photos per
                              subject and $CLASSES_FILE (required)
  --out=DIR                   where the runs, models/ and eval/ go (required)
  --subjects=all|A,B,...      subjects to train and evaluate (default: all)
  --eval-config=PATH[:VAR]    evaluation config (default:
                              configs/eval_dreambench.py)
  --eval-arg=ARG              extra argument for the evaluation, e.g.
                              --eval-arg=--config.num_prompts=5 (repeatable)
  --skip-train                only link the models and evaluate
  --skip-eval                 only train
  --python=PY                 Python interpreter (default: python)
  --dry-run                   print every command, one per line; run nothing
  -h, --help                  this help

Example:
  $PROG --config=configs/rpo_tpu.py --dataset-dir=../shared/dreambench/dataset \\
      --out=/tmp/rpo-dreambench --subjects=dog,backpack -- --config.num_steps=400
  $PROG --config=configs/dreambooth_tpu.py:lora \\
      --dataset-dir=../shared/dreambench/dataset --out=/tmp/lora-dreambench
EOF
}

# shellcheck source=_common.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

CONFIG="" DATASET="" OUT="" SUBJECTS=all EVAL_CONFIG=configs/eval_dreambench.py
SKIP_TRAIN=0 SKIP_EVAL=0 PYTHON=python DRY_RUN=0 EVAL_ARGS=()
# Options override the defaults above; EXTRA gets the arguments after --.
# --eval-arg's values are themselves options: --eval-arg=--config.x=1.
parse_options "--config=CONFIG --dataset-dir=DATASET --out=OUT
               --subjects=SUBJECTS --eval-config=EVAL_CONFIG
               --eval-arg+=EVAL_ARGS --python=PYTHON" \
              "--skip-train=SKIP_TRAIN --skip-eval=SKIP_EVAL
               --dry-run=DRY_RUN" "$@"
DATASET=${DATASET%/} OUT=${OUT%/}

# ------------------------------------------------------------------ checks --
[[ -n $CONFIG ]] || die "pass --config=configs/RECIPE.py[:variant]"
[[ -n $DATASET ]] || die "pass --dataset-dir=DIR (the DreamBooth dataset folder)"
[[ -n $OUT ]] || die "pass --out=DIR (where the runs and the evaluation go)"
[[ -f ${CONFIG%%:*} ]] || die "no config file ${CONFIG%%:*}; pass --config=configs/RECIPE.py"
if (( ! SKIP_EVAL )); then
  [[ -f ${EVAL_CONFIG%%:*} ]] ||
    die "no evaluation config ${EVAL_CONFIG%%:*}; pass --eval-config=configs/eval_dreambench.py"
fi
[[ -d $DATASET ]] || die "--dataset-dir=$DATASET is not a folder"
[[ -f $DATASET/$CLASSES_FILE ]] ||
  die "$DATASET/$CLASSES_FILE is missing; pass the dataset/ folder of google/dreambooth"

# The "subject_name,class" table of prompts_and_classes.txt, in file order.
declare -A CLASS_OF=()
KNOWN=()
while IFS=$'\t' read -r name noun; do
  CLASS_OF[$name]=$noun
  KNOWN+=("$name")
done < <(awk '
  { sub(/\r$/, "") }
  /^subject_name,class[ \t]*$/ { table = 1; next }
  table && /^Prompts/ { exit }
  table && index($0, ",") {
    name = substr($0, 1, index($0, ",") - 1)
    noun = substr($0, index($0, ",") + 1)
    gsub(/^[ \t]+|[ \t]+$/, "", name); gsub(/^[ \t]+|[ \t]+$/, "", noun)
    if (name != "" && noun != "") print name "\t" noun
  }' "$DATASET/$CLASSES_FILE")
(( ${#KNOWN[@]} )) ||
  die "$DATASET/$CLASSES_FILE has no 'subject_name,class' table; restore the upstream file"

if [[ $SUBJECTS == all ]]; then
  CHOSEN=("${KNOWN[@]}")
else
  IFS=, read -r -a CHOSEN <<< "$SUBJECTS"
  (( ${#CHOSEN[@]} )) || die "--subjects is empty; pass all or names such as dog,cat"
fi
for s in "${CHOSEN[@]}"; do
  [[ -n $s && -n ${CLASS_OF[$s]+x} ]] ||
    die "unknown subject '$s' in --subjects; known: $(IFS=,; echo "${KNOWN[*]}")"
  [[ -d $DATASET/$s ]] || die "no photos folder $DATASET/$s for subject $s"
done

# ------------------------------------------------------------------- train --
if (( ! SKIP_TRAIN )); then
  for s in "${CHOSEN[@]}"; do
    run "$PYTHON" -m personalize_jax.main --config="$CONFIG" --workdir="$OUT/$s" \
      --config.data.instance_dir="$DATASET/$s" \
      --config.data.class_name="${CLASS_OF[$s]}" \
      --config.final_eval.enabled=false ${EXTRA[@]+"${EXTRA[@]}"}
  done
fi

# -------------------------------------------------------------------- eval --
# The evaluator samples a subject from <model>/<subject>/ when that holds a
# pipeline or a LoRA (then fused into the base its train_config.json names);
# each run exports to <run>/export, so models/ links them under the subject
# names (relative links: OUT can be moved).
(( ! SKIP_EVAL )) || exit 0
if (( ! DRY_RUN )); then
  for s in "${CHOSEN[@]}"; do
    [[ -f $OUT/$s/export/model_index.json ||
       -f $OUT/$s/export/pytorch_lora_weights.safetensors ]] ||
      die "no trained pipeline or LoRA in $OUT/$s/export; train $s first (drop --skip-train)"
  done
fi
run mkdir -p "$OUT/models"
for s in "${CHOSEN[@]}"; do
  run ln -sfn "../$s/export" "$OUT/models/$s"
done
run "$PYTHON" -m personalize_jax.evaluate --config="$EVAL_CONFIG" \
  --config.model="$OUT/models" --config.dataset_dir="$DATASET" \
  --config.subjects="$(IFS=,; echo "${CHOSEN[*]}")" --workdir="$OUT/eval" \
  ${EVAL_ARGS[@]+"${EVAL_ARGS[@]}"}
if (( ! DRY_RUN )); then
  printf '%s: metrics table in %s/eval/metrics.md\n' "$PROG" "$OUT" >&2
fi
