"""Training on the DeepSpeed engine.

engine       the process group, DeepSpeed JSON loading and checks, optimizer, schedule, `initialize`
optim        ElectraAdam: Adam without bias correction, decoupled weight decay (the recipe's optimizer)
pretrain     flags, `pretraining_step`, evaluation and the pretraining loop (`run`, `main`)
checkpoint   checkpoints with a manifest written last, per-rank RNG, keep-last-K, fallback past damaged ones
metrics_log  device-side metric sums, metrics.jsonl, wandb, the collapse monitor
plots        training_curves.png
finetune     GLUE fine-tuning (with glue_metrics, glue_report, layerwise_lr)
"""
