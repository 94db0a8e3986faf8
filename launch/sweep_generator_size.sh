#!/usr/bin/env bash
# RC2020 experiment 2 (cccwam/rc2020_electra README, "Sensitivity to generator"): pretrain ELECTRA-Small once per
# generator size with the README's exact flags. Each run gets its own output directory,
# runs/pretraining_OWT/small-gen<SIZE>x1 (the default --output_dir names the generator size), so the runs never
# mix checkpoints, and rerunning the script resumes each unfinished run.
#
#   bash launch/sweep_generator_size.sh                                   # one process (GPU or CPU)
#   LAUNCHER="deepspeed --num_gpus 8" bash launch/sweep_generator_size.sh # or torchrun --nproc_per_node 8
#   SIZES="0.25 1.0" bash launch/sweep_generator_size.sh --data /path/to/cache --max_steps 100000
#
# SIZES defaults to the README's 0.125, 0.5, 0.75 and 1.0 plus experiment 1's 0.25. Extra arguments go to every run
# (the README's flags come first, so yours override them). The README's --per_device_train_batch_size 128 is left
# out: on one process the default is the same 128, and on several it keeps the global batch at the recipe's 128
# (128 per device on 8 GPUs would be a batch of 1024 at the same learning rate: another experiment).
set -euo pipefail
cd "$(dirname "$0")/.."

LAUNCHER=${LAUNCHER:-python}
SIZES=${SIZES:-"0.125 0.25 0.5 0.75 1.0"}

for size in $SIZES; do
  echo "=== generator_size ${size} ==="
  # shellcheck disable=SC2086  # LAUNCHER is a command line
  $LAUNCHER launch/pretrain.py --mlm_probability 0.15  --mlm_replacement_probability 0.85 --max_length 128 \
    --gradient_accumulation_steps 1 --logging_steps 3840 --eval_steps 12800 \
    --save_steps 1280000 --experiment_name pretraining_OWT --generator_layer_size 1.0 --generator_size "${size}" \
    "$@"
done
