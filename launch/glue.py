#!/usr/bin/env python
"""Fine-tune a pretrained ELECTRA discriminator on one GLUE task (several seeds) and refresh the results.

    python launch/glue.py --model RUN_DIR --task RTE --output_dir glue_out --glue_dir ../shared/data/glue
    python launch/glue.py --report_only --output_dir glue_out      # rebuild results.json / results.md only

MODEL is a pretraining output directory, one of our model/checkpoint directories, our HF export, or any
Hugging Face ELECTRA discriminator directory (config.json + weights, tokenizer files alongside).
Without --glue_dir the data comes from Hugging Face datasets (nyu-mll/glue). `launch/glue.sh` runs all tasks.
A task without files in --glue_dir is recorded as absent (exit 0; an earlier result of it is kept); a --glue_dir
that does not exist, or data Hugging Face cannot load, is an error (exit 2). Seeds that an interrupted call
finished with the same settings are reused.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import asdict, fields

from electra_ds.data.glue import GlueDataError
from electra_ds.data.tokenizer import TokenizerError
from electra_ds.train.engine import OPTIMIZERS
from electra_ds.train.finetune import FinetuneArgs, run_task
from electra_ds.train.glue_report import build_report
from electra_ds.train.layerwise_lr import RULES


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="pretrained model directory (see above)")
    p.add_argument("--task", help="GLUE task: CoLA, SST-2, MRPC, STS-B, QQP, MNLI, QNLI, RTE, WNLI")
    p.add_argument("--output_dir", required=True)
    p.add_argument("--glue_dir", help="GLUE data in the original TSV layout (default: Hugging Face datasets)")
    p.add_argument("--tokenizer", help="tokenizer dir/file (default: found next to the model)")
    p.add_argument("--seeds", type=int, default=5, help="number of fine-tuning runs (seeds seed..seed+n-1)")
    p.add_argument("--seed", type=int, default=0, help="first seed")
    p.add_argument("--model_name", help="name in the results table (default: the model directory's name)")
    p.add_argument("--pretrain_pfs_days", type=float,
                   help="pretraining compute for the efficiency line (default: from the run's metrics.jsonl)")
    p.add_argument("--report_only", action="store_true", help="only rebuild results.json / results.md")
    p.add_argument("--no_test", action="store_true", help="skip test-set predictions (no submission files)")
    p.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    hp = p.add_argument_group("fine-tuning hyperparameters (the ELECTRA recipe by default)")
    hp.add_argument("--learning_rate", type=float, help="default by model size: small 3e-4, base 1e-4, large 5e-5")
    hp.add_argument("--layerwise_lr_decay", type=float, help="default by model size: large 0.9, others 0.8")
    hp.add_argument("--layerwise_lr_decay_rule", choices=RULES,
                    help="intended: layer l gets decay^(L-l), embeddings decay^(L+1); original: one more power "
                         "of decay on every group but the head (the original code)")
    hp.add_argument("--warmup_proportion", type=float)
    hp.add_argument("--epochs", type=float, help="default: 3, or 10 for RTE and STS-B")
    hp.add_argument("--batch_size", type=int)
    hp.add_argument("--eval_batch_size", type=int)
    hp.add_argument("--max_length", type=int)
    hp.add_argument("--weight_decay", type=float)
    hp.add_argument("--adam_eps", type=float)
    hp.add_argument("--gradient_accumulation_steps", type=int)
    hp.add_argument("--max_train_samples", type=int, help="read at most this many rows of the train split (MRPC "
                    "and STS-B then train on both orders of each)")
    hp.add_argument("--max_steps", type=int, help="stop after this many optimizer steps")
    hp.add_argument("--ds_config", help="DeepSpeed JSON path or shipped name (ds_configs/: fp32, bf16, bf16_zero2, "
                    "...); default bf16 on a bf16 GPU, fp16 on older GPUs, fp32 without a GPU")
    hp.add_argument("--optimizer", choices=OPTIMIZERS,
                    help="auto: ELECTRA's Adam without bias correction (cpu_adam under ZeRO-Offload)")
    hp.add_argument("--double_unordered", action=argparse.BooleanOptionalAction,
                    help="MRPC and STS-B train on both orders of each pair (default, as google-research/electra)")
    p.set_defaults(**asdict(FinetuneArgs()))  # the hyperparameters' defaults are FinetuneArgs' own
    args = p.parse_args(argv)
    if not args.report_only and not (args.model and args.task):
        p.error("--model and --task are required (or --report_only)")
    if args.seeds < 1:
        p.error(f"--seeds must be >= 1, got {args.seeds}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except (GlueDataError, TokenizerError, FileNotFoundError, KeyError, ValueError) as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"glue.py: error: {message}", file=sys.stderr)
        return 2


def run(args: argparse.Namespace) -> int:
    if args.report_only:
        report = build_report(args.output_dir, model_name=args.model_name, pfs_days=args.pretrain_pfs_days)
        print(f"wrote {args.output_dir}/results.json and results.md (tasks with results: "
              f"{', '.join(n for n, t in report['tasks'].items() if t['status'] == 'ok') or 'none'})")
        return 0
    hparams = FinetuneArgs(**{f.name: getattr(args, f.name) for f in fields(FinetuneArgs)})
    result = run_task(args.model, args.task, args.output_dir, seeds=range(args.seed, args.seed + args.seeds),
                      args=hparams, glue_dir=args.glue_dir, tokenizer_path=args.tokenizer,
                      pfs_days=args.pretrain_pfs_days, model_name=args.model_name, predict_test=not args.no_test)
    if result["status"] == "absent":
        print(f"{result['task']}: absent ({result['reason']})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
