#!/usr/bin/env bash
# Quickstart: tokenize the `builtin` corpus (English text that ships with Python) into a token cache, then pretrain
# the `tiny` ELECTRA preset for 300 steps on whatever device there is (a GPU with bf16, else the CPU), and say where
# the metrics, training curves, checkpoint and Hugging Face export are. About half a minute on 2 CPU cores.
#
#   pip install -e .
#   bash launch/quickstart.sh                      # output in runs/quickstart
#   bash launch/quickstart.sh --max_steps 100      # any launch/pretrain.py flag overrides the ones below
#
# Running it again resumes from runs/quickstart's last checkpoint (and returns at once when it is finished);
# delete runs/quickstart to start over.
set -euo pipefail
cd "$(dirname "$0")/.."

python launch/pretrain.py \
  --model_size tiny \
  --data builtin \
  --vocab_size_to_train 4096 \
  --max_length 64 \
  --per_device_train_batch_size 32 \
  --max_steps 300 \
  --logging_steps 320 \
  --eval_steps 3200 \
  --save_steps 3200 \
  --eval_batches 10 \
  --experiment_name quickstart \
  --output_dir runs/quickstart \
  --wandb disabled \
  "$@"
