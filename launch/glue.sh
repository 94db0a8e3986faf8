#!/usr/bin/env bash
# Fine-tune MODEL on the GLUE tasks and write OUT_DIR/results.json, results.md (and submission/ files).
#
#   launch/glue.sh MODEL OUT_DIR [extra glue.py options]
#
# Environment:
#   TASKS              comma-separated tasks (default: all 9: CoLA,SST-2,MRPC,STS-B,QQP,MNLI,QNLI,RTE,WNLI)
#   SEEDS              fine-tuning runs per task (default 5)
#   GLUE_DIR           GLUE data in the original TSV layout (default: Hugging Face datasets, needs internet); a task
#                      without files there is recorded as absent, a GLUE_DIR that does not exist is an error
#   DS_CONFIG          DeepSpeed JSON deciding precision/ZeRO (default: bf16.json on a bf16 GPU, fp16.json on older
#                      GPUs, fp32.json without a GPU)
#   MAX_TRAIN_SAMPLES  cap on the train rows read per task (quick runs; MRPC, STS-B train on both pair orders)
#   EPOCHS             epochs for every task (default: the recipe's 3, or 10 for RTE and STS-B)
#   SKIP_TEST=1        no test-set predictions / submission files
#   PYTHON             the interpreter (default: python3)
#   LAUNCHER           command that runs glue.py (default: $PYTHON; e.g. "torchrun --nproc_per_node 2")
set -euo pipefail

if [[ $# -lt 2 ]]; then
    echo "usage: $0 MODEL OUT_DIR [extra launch/glue.py options]" >&2
    exit 2
fi
MODEL=$1
OUT_DIR=$2
shift 2
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
TASKS=${TASKS:-CoLA,SST-2,MRPC,STS-B,QQP,MNLI,QNLI,RTE,WNLI}
PYTHON=${PYTHON:-python3}
LAUNCHER=${LAUNCHER:-$PYTHON}

# glue.py checks it as well, but under a LAUNCHER every process would fail, with the launcher's exit code
if [[ -n ${GLUE_DIR:-} && ! -d $GLUE_DIR ]]; then
    echo "$0: GLUE_DIR=$GLUE_DIR is not a directory; set it to the GLUE data (original TSV layout), or unset it" \
         "to read Hugging Face datasets" >&2
    exit 2
fi

args=(--model "$MODEL" --output_dir "$OUT_DIR" --seeds "${SEEDS:-5}")
[[ -n ${GLUE_DIR:-} ]] && args+=(--glue_dir "$GLUE_DIR")
[[ -n ${DS_CONFIG:-} ]] && args+=(--ds_config "$DS_CONFIG")
[[ -n ${MAX_TRAIN_SAMPLES:-} ]] && args+=(--max_train_samples "$MAX_TRAIN_SAMPLES")
[[ -n ${EPOCHS:-} ]] && args+=(--epochs "$EPOCHS")
[[ ${SKIP_TEST:-0} == 1 ]] && args+=(--no_test)

IFS=',' read -r -a task_list <<< "$TASKS"
for task in "${task_list[@]}"; do
    echo "=== $task" >&2
    # shellcheck disable=SC2086  # LAUNCHER may be a command with arguments
    $LAUNCHER "$HERE/glue.py" --task "$task" "${args[@]}" "$@"
done
$PYTHON "$HERE/glue.py" --report_only --output_dir "$OUT_DIR"
cat "$OUT_DIR/results.md"
