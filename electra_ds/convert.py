"""Convert between electra_ds checkpoints and Hugging Face ELECTRA directories.

    python -m electra_ds.convert to-hf CHECKPOINT OUT_DIR [--tokenizer DIR]
    python -m electra_ds.convert from-hf DISC_DIR GEN_DIR OUT
"""
from __future__ import annotations

import argparse
import sys

from electra_ds.model.hf import export_hf_pair, load_hf_pair, load_pretrained, save_model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m electra_ds.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    to_hf = sub.add_parser("to-hf", help="our model dir / pretraining output -> HF discriminator/ + generator/")
    to_hf.add_argument("checkpoint")
    to_hf.add_argument("out_dir")
    to_hf.add_argument("--tokenizer", help="directory whose tokenizer files are copied next to the weights")
    from_hf = sub.add_parser("from-hf", help="HF discriminator + generator directories -> our model dir")
    from_hf.add_argument("disc_dir")
    from_hf.add_argument("gen_dir")
    from_hf.add_argument("out")
    args = parser.parse_args(argv)
    try:
        if args.command == "to-hf":
            out = export_hf_pair(load_pretrained(args.checkpoint), args.out_dir, args.tokenizer)
        else:
            out = save_model(load_hf_pair(args.disc_dir, args.gen_dir), args.out)
    except (OSError, ValueError, KeyError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
