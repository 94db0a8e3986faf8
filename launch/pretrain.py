"""Pretrain ELECTRA on DeepSpeed: `python launch/pretrain.py --help`.

Runs with plain `python` (one process, GPU or CPU), `torchrun --nproc_per_node N`, or
`deepspeed [--num_gpus N | --hostfile FILE] launch/pretrain.py ...`. See electra_ds/train/pretrain.py.
"""
import sys

from electra_ds.train.pretrain import main

if __name__ == "__main__":
    sys.exit(main())
