#!/usr/bin/env bash
# The one script for the lent GPU machine (../shared/device/README.md), run from the repository root with the
# .whl/ folder carried alongside (prepare it here with `bash ../shared/device/wheels.sh`):
#
#   bash benchmarks/gpu_check.sh
#
# 1. installs the carried wheels (deepspeed and what it needs) into /tmp/site,
# 2. prints the GPU (nvidia-smi) and the versions,
# 3. runs the GPU-marked tests (kernels vs twins, attention included; no host sync in the engine step, eager and
#    CUDA graphs),
# 4. times ELECTRA-Small bf16, batch 128 x 128: every variant of benchmarks/throughput.py in the order of $VARIANTS
#    (the JSON and the table are rewritten after each, so an overrun keeps what finished), each followed by its
#    host syncs per step and a 3-step profile (GPU busy time per step, top kernels: benchmarks/step_profile.py);
#    with INDUCTOR_SETS, the engine step with CUDA graphs again under each set of inductor settings,
# 5. with REAL_LOOP=1, the real training loop (launch/pretrain.py, Small, --compile reduce-overhead, 3000 steps:
#    tokens/s per 50 steps in real_loop_metrics.jsonl; its time is kept aside from the throughput stage),
# 6. if time is left, the LayerNorm and GELU backward kernels under each candidate blocking and as torch.compile traces
#    them (benchmarks/kernel_speed.py --row_configs), our attention under each candidate blocking
#    (--attention_configs), each fused kernel timed against its twin and plain torch, and one layer's attention under
#    each SDPA backend and ours (benchmarks/kernel_speed.py), and a batch sweep (256, 512) of the eager variants.
# Logs (gpu_check.log: everything; pytest_gpu_kernels.log, pytest_gpu.log), JSON and tables (throughput.*,
# inductor_N.*, real_loop_metrics.jsonl, row_configs.json, kernels.json, attention_configs.json, sweep.*) go to $OUT
# (./gpu_out when OUT is unset); at the end all but gpu_check.log are packed into $OUT/results.tar.gz (at most
# 8 files come back from the device tool). The whole script keeps within GPU_CHECK_BUDGET_S seconds (default 520,
# under 9 minutes): every stage runs under `timeout`, sized from what is left. Without an NVIDIA GPU it says so and
# exits 0 at once; otherwise it exits 1 if a stage failed or timed out.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
BUDGET=${GPU_CHECK_BUDGET_S:-520}
# The headline pair first (HF eager, our engine step with CUDA graphs), then the same step without the engine (their
# difference is the engine's cost), then the HF CUDA-graph baseline that the first H200 run (benchmarks/results/)
# had no time left for, then the rest. Each compiled variant takes about a minute to compile; max-autotune takes
# minutes, so it is left to a second call (below).
VARIANTS=${VARIANTS:-hf_eager,ours_ds_compile_cudagraphs,ours_compile_cudagraphs,hf_compile_cudagraphs,ours_ds_triton,ours_ds_torch,ours_bare,hf_compile,ours_compile}
# SKIP_TESTS=1 skips the two pytest stages, VARIANTS=none the throughput stage, and REAL_LOOP=1 adds the real
# training loop (REAL_LOOP_STEPS steps, default 3000), for a second call:
#   SKIP_TESTS=1 REAL_LOOP=1 VARIANTS=ours_ds_compile_max_autotune bash benchmarks/gpu_check.sh
# INDUCTOR_SETS="SET; SET; ...", each set one or more KEY=VALUE inductor settings (pretrain.py's --inductor) separated
# by spaces, times ours_ds_compile_cudagraphs again under each set after the throughput stage, e.g.
# INDUCTOR_SETS="combo_kernels=True; coordinate_descent_tuning=True" (inductor_N.*). A set's ELECTRA_DS_* tokens are
# environment variables for its run instead, e.g. "ELECTRA_DS_COMPILED_LAYER_NORM=opaque" (our LayerNorm kernels
# as opaque ops under compile, kernels.set_compiled_layer_norm).
# INDUCTOR_VARIANTS: which variants each set times (e.g. "ours_ds_compile_cudagraphs,hf_compile_cudagraphs" to give
# the HF baseline the same settings; each compiled variant adds about 75 s to the set's share, INDUCTOR_SET_S).
INDUCTOR_SETS=${INDUCTOR_SETS:-}
INDUCTOR_VARIANTS=${INDUCTOR_VARIANTS:-ours_ds_compile_cudagraphs}
IFS=';' read -ra INDUCTOR_SET_LIST <<<"$INDUCTOR_SETS"
SET_S=${INDUCTOR_SET_S:-180}  # each inductor set's share: a compile (66 to over 120 s at 9d46b65) and the timing
SKIP_TESTS=${SKIP_TESTS:-0}
# The throughput stage's most seconds: each compiled variant compiles for 66 to 117 s on an H200 (9d46b65), so four
# (the HF baselines, our step with and without the engine) want about 420.
THROUGHPUT_S=${THROUGHPUT_S:-330}
REAL_LOOP=${REAL_LOOP:-0}
LOOP_S=240  # the real loop's share: 3000 steps took 189 s on an H200 at e21871c, 131 s of them compiling
START=$SECONDS

left() { echo $((BUDGET - (SECONDS - START))); }

# A stage's time limit: at most $1 seconds, keeping $2 seconds for the stages after it (1 at least).
limit() {
  local room=$(( $(left) - $2 ))
  room=$(( room < $1 ? room : $1 ))
  echo $(( room < 1 ? 1 : room ))
}

banner() { echo; echo "=== [gpu_check +$((SECONDS - START))s] $*"; }

# A stage's exit status: reported, and remembered as the script's (1) unless 0, or 5 (pytest: nothing selected).
RC=0
status() {
  echo "gpu_check: $1 exit status $2 (124 = timed out)"
  if [ "$2" -ne 0 ] && [ "$2" -ne 5 ]; then RC=1; fi
}

main() {
  if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
    echo "gpu_check: no NVIDIA GPU here (nvidia-smi missing or failing): GPU tests and benchmark skipped"
    return 0
  fi

  banner "installing the carried wheels"
  if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      .whl/*.whl || echo "gpu_check: WARNING: wheel install failed; the DeepSpeed variants will fail"
  else
    echo "gpu_check: WARNING: no .whl/ here (carry it); the DeepSpeed variants will fail"
  fi
  export PYTHONPATH=/tmp/site:$PWD TORCH_CUDA_ARCH_LIST=9.0 PYTHONUNBUFFERED=1

  banner "device and versions"
  nvidia-smi
  python3 - <<'PY'
import importlib.metadata as md
import torch
print("python3 torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(), "capability", torch.cuda.get_device_capability())
for name in ("transformers", "triton", "deepspeed", "pydantic", "datasets"):
    try:
        print(name, md.version(name))
    except md.PackageNotFoundError:
        print(name, "not installed")
PY
  if ! python3 -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: torch sees no CUDA device: GPU tests and benchmark skipped"
    return 0
  fi

  local t
  if [ "$SKIP_TESTS" = 1 ]; then
    banner "GPU tests skipped (SKIP_TESTS=1)"
  else
    # Keep time for the stages after the tests: the throughput (unless VARIANTS=none), inductor sets, real loop.
    local later=$(( ${#INDUCTOR_SET_LIST[@]} * SET_S + (REAL_LOOP == 1 ? LOOP_S : 0) ))
    [ "$VARIANTS" = none ] || later=$((later + THROUGHPUT_S - 20))
    # 169 tests took 77 s on the H200 before the attention kernels' (each dtype and blocking a Triton compile); at
    # 9d46b65 the attention tests, run first, used the stage's 150 s after 70 tests: now last, and one line per test
    # (-v), so that a stage cut short still names what passed
    t=$(limit 150 $((later + 90)))
    banner "GPU kernel tests (kernels vs twins, at most ${t}s)"
    timeout -k 10 "$t" python3 -m pytest -m gpu -v -p no:cacheprovider -rfEs tests/test_kernels.py \
      tests/test_kernel_adam.py tests/test_attention_kernel.py 2>&1 | tee "$OUT/pytest_gpu_kernels.log"
    status "kernel tests" "${PIPESTATUS[0]}"
    t=$(limit 90 "$later")
    banner "the engine step's GPU tests (no host syncs, eager and CUDA graphs; at most ${t}s)"
    # Named directly: collecting all of tests/ would import scipy, sklearn and matplotlib, which the image lacks.
    timeout -k 10 "$t" python3 -m pytest -m gpu -q -p no:cacheprovider -rfEs tests/test_host_sync.py 2>&1 \
      | tee "$OUT/pytest_gpu.log"
    status "engine step GPU tests" "${PIPESTATUS[0]}"
  fi

  if [ "$VARIANTS" = none ]; then
    banner "throughput skipped (VARIANTS=none)"
  else
    t=$(limit "$THROUGHPUT_S" $(( ${#INDUCTOR_SET_LIST[@]} * SET_S + (REAL_LOOP == 1 ? LOOP_S : 0) + 45 )))
    banner "throughput: ELECTRA-Small bf16 128 x 128, all variants (at most ${t}s)"
    # No new variant starts in the last 70 s (a compile would not finish); a window shorter than that gets no such cut.
    local cut=()
    (( t > 70 )) && cut=(--max_seconds $((t - 70)))
    timeout -k 10 "$t" python3 benchmarks/throughput.py --model_size small --batch_size 128 --max_length 128 \
      --precision bf16 --steps 30 --warmup 10 --profile_steps 3 "${cut[@]}" \
      --variants "$VARIANTS" --json "$OUT/throughput.json" --markdown "$OUT/throughput.md"
    status "throughput (the JSON keeps finished variants)" $?
  fi

  local n=0 settings flags
  for settings in "${INDUCTOR_SET_LIST[@]}"; do
    read -ra flags <<<"$settings"
    (( ${#flags[@]} )) || continue
    split_set "${flags[@]}"
    n=$((n + 1))
    if (( $(left) < 100 )); then
      banner "throughput with inductor settings ${flags[*]} skipped: $(left)s left"
      continue
    fi
    t=$(limit $SET_S $(( (${#INDUCTOR_SET_LIST[@]} - n) * SET_S + (REAL_LOOP == 1 ? LOOP_S : 0) + 10 )))
    banner "throughput with inductor settings ${flags[*]}: $INDUCTOR_VARIANTS (at most ${t}s)"
    env "${SET_ENV[@]}" timeout -k 10 "$t" python3 benchmarks/throughput.py --model_size small --batch_size 128 \
      --max_length 128 --precision bf16 --steps 30 --warmup 10 --profile_steps 3 --no_check \
      --variants "$INDUCTOR_VARIANTS" "${SET_FLAGS[@]}" --json "$OUT/inductor_$n.json" --markdown "$OUT/inductor_$n.md"
    status "throughput with inductor settings ${flags[*]}" $?
  done

  if (( REAL_LOOP == 1 && $(left) >= 150 )); then
    t=$(limit $LOOP_S 5)
    banner "the real training loop: launch/pretrain.py, ELECTRA-Small bf16 on the builtin corpus (at most ${t}s)"
    # Data loading, masking, the compiled engine step, the device meter and logging every 50 steps: the first
    # record includes the compile, the later ones are the loop's steady speed.
    rm -rf /tmp/gpu_check_loop  # a warm machine keeps the last call's run
    timeout -k 10 "$t" python3 launch/pretrain.py --model_size small --data builtin --cache_root /tmp/gpu_check_caches \
      --output_dir /tmp/gpu_check_loop --resume none --max_steps "${REAL_LOOP_STEPS:-3000}" --logging_steps 6400 \
      --eval_batches 0 --save_steps 100000000 --compile reduce-overhead --deepspeed_config bf16 --wandb disabled \
      --no-export_hf
    status "real training loop" $?
    cp /tmp/gpu_check_loop/metrics.jsonl "$OUT/real_loop_metrics.jsonl" 2>/dev/null
  elif (( REAL_LOOP == 1 )); then
    banner "real training loop skipped: $(left)s left"
  fi

  if (( $(left) >= 40 )); then
    t=$(limit 120 5)  # 19 blockings, each built for both towers' widths, then 4 compiles of the traced ops
    banner "the LayerNorm and GELU backward kernels under each candidate blocking (at most ${t}s)"
    timeout -k 10 "$t" python3 benchmarks/kernel_speed.py --row_configs --json "$OUT/row_configs.json"
    status "row blockings" $?
  fi

  if (( $(left) >= 40 )); then
    t=$(limit 60 5)
    banner "our attention under each candidate blocking (at most ${t}s)"
    timeout -k 10 "$t" python3 benchmarks/kernel_speed.py --attention_configs --json "$OUT/attention_configs.json"
    status "attention blockings" $?
  fi

  if (( $(left) >= 30 )); then
    t=$(limit 150 5)  # its last section compiles the LayerNorm and GELU ops six times
    banner "fused kernels vs twins vs torch, ELECTRA-Small shapes (at most ${t}s)"
    timeout -k 10 "$t" python3 benchmarks/kernel_speed.py --json "$OUT/kernels.json"
    status kernels $?
  fi

  if (( $(left) >= 60 )); then
    t=$(limit 120 5)
    banner "throughput sweep: batch 256, 512, eager variants (at most ${t}s)"
    timeout -k 10 "$t" python3 benchmarks/throughput.py --model_size small --batch_sizes 256,512 --max_length 128 \
      --precision bf16 --steps 20 --warmup 5 --no_check --max_seconds $((t > 30 ? t - 30 : 0)) \
      --variants hf_eager,ours_ds_triton,ours_bare,ours_ds_torch \
      --json "$OUT/sweep.json" --markdown "$OUT/sweep.md"
    status sweep $?
  else
    banner "throughput sweep skipped: $(left)s left"
  fi

  banner "summary"
  for f in throughput.md sweep.md; do
    [ -f "$OUT/$f" ] && { echo "--- $f"; cat "$OUT/$f"; }
  done
  pack_results
  return "$RC"
}

# An inductor set's tokens: ELECTRA_DS_* ones into SET_ENV (the environment of its run), the others into SET_FLAGS
# (throughput.py's --inductor=KEY=VALUE).
split_set() {
  SET_ENV=() SET_FLAGS=()
  local flag
  for flag in "$@"; do
    if [[ $flag == ELECTRA_DS_* ]]; then SET_ENV+=("$flag"); else SET_FLAGS+=("--inductor=$flag"); fi
  done
}

# The device tool brings back at most 8 files from $OUT (two inductor sets alone make 4): all but this log go back
# as one archive, results.tar.gz (unpack with tar -xzf). A run cut short by its limit leaves them unpacked.
pack_results() {
  local files=()
  for f in "$OUT"/*; do
    [ -f "$f" ] && [ "$(basename "$f")" != gpu_check.log ] && files+=("$(basename "$f")")
  done
  (( ${#files[@]} )) || return 0
  if tar -czf "$OUT/results.tar.gz" -C "$OUT" "${files[@]}"; then
    (cd "$OUT" && rm -f "${files[@]}")
    echo "gpu_check: ${files[*]} packed in results.tar.gz"
  else
    echo "gpu_check: WARNING: packing failed; the files stay as they are (only 8 come back)"
  fi
}

main 2>&1 | tee "$OUT/gpu_check.log"
exit "${PIPESTATUS[0]}"
