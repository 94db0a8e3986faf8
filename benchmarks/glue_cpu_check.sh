#!/usr/bin/env bash
# A small end-to-end check on real data, sized for a CPU: `tiny` ELECTRA from random initialisation vs `tiny` after a
# short pretraining on ../shared/data/corpus/gutenberg, fine-tuned on RTE, MRPC, CoLA, SST-2 and STS-B from
# ../shared/data/glue (2 seeds, at most 4000 train rows per task; MRPC and STS-B train on both orders of each).
# About 20 minutes on 2 CPU cores.
#
#   bash benchmarks/glue_cpu_check.sh [WORK_DIR]      # default WORK_DIR: runs/glue_cpu_check
#
# Results: WORK_DIR/glue_random/results.md and WORK_DIR/glue_pretrained/results.md.
set -euo pipefail
cd "$(dirname "$0")/.."
W=${1:-runs/glue_cpu_check}
DATA=${DATA:-../shared/data}
mkdir -p "$W"
[ -f "$W/cache/manifest.json" ] || python launch/build_cache.py --source "$DATA/corpus/gutenberg" --strip_gutenberg \
  --vocab_size 8192 --heldout_fraction 0.05 --output "$W/cache"
python launch/pretrain.py --model_size tiny --data "$W/cache" --max_length 128 --per_device_train_batch_size 32 \
  --max_steps 800 --warmup_steps 100 --learning_rate 1e-3 --logging_steps 3200 --eval_steps 16000 \
  --save_steps 16000 --eval_batches 20 --wandb disabled --output_dir "$W/pretrained"
python - "$W" <<'PY'
import sys
import torch
from electra_ds.config import preset
from electra_ds.data.cache import TokenCache
from electra_ds.model import ElectraForPretraining, export_hf_pair
work = sys.argv[1]
cache = TokenCache(f"{work}/cache")
torch.manual_seed(0)
export_hf_pair(ElectraForPretraining(preset("tiny", vocab_size=cache.vocab_size)), f"{work}/random", cache.tokenizer_path)
PY
for m in random pretrained; do
  model=$W/$m; [ $m = random ] && model=$W/random/discriminator
  TASKS=RTE,MRPC,CoLA,SST-2,STS-B SEEDS=2 MAX_TRAIN_SAMPLES=4000 SKIP_TEST=1 GLUE_DIR=$DATA/glue \
    bash launch/glue.sh "$model" "$W/glue_$m" --learning_rate 1e-3 --model_name "tiny-$m"
done
cat "$W/glue_random/results.md" "$W/glue_pretrained/results.md"
