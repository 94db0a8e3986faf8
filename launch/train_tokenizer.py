#!/usr/bin/env python
"""Train an uncased WordPiece tokenizer ([PAD] [UNK] [CLS] [SEP] [MASK]) on a text source.

    python launch/train_tokenizer.py --source ../shared/data/corpus/gutenberg --strip_gutenberg \
        --vocab_size 30522 --output tokenizer/

SOURCE is 'builtin' (text shipped with Python), local .txt/.txt.gz/.jsonl/.jsonl.gz/.parquet files or
folders, or a Hugging Face dataset name (e.g. openwebtext). The output directory gets tokenizer.json,
vocab.txt and tokenizer_config.json; any existing tokenizer.json / vocab.txt (e.g. BERT uncased) can be
used instead wherever the project asks for a tokenizer.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from electra_ds.data.sources import SourceError, add_source_arguments, open_source, source_options
from electra_ds.data.tokenizer import TokenizerError, load_tokenizer, special_ids, train_tokenizer, vocab_size


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", default="openwebtext", help="builtin, files/folders, or a Hugging Face dataset")
    p.add_argument("--output", required=True, help="directory to write the tokenizer to")
    p.add_argument("--vocab_size", type=int, default=30522)
    p.add_argument("--sample_mb", type=float, default=256.0, help="train on at most this many MB of text")
    p.add_argument("--min_frequency", type=int, default=2)
    add_source_arguments(p)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    if Path(args.output).exists() and not Path(args.output).is_dir():  # found before the training, not after
        print(f"error: --output {args.output} exists and is not a directory; give a new or existing directory",
              file=sys.stderr)
        return 2
    try:
        source = open_source(args.source, **source_options(args))
        out = train_tokenizer(source.texts(int(args.sample_mb * 1e6)), args.vocab_size, args.output,
                              min_frequency=args.min_frequency, show_progress=True)
        tok = load_tokenizer(out)
    except (SourceError, TokenizerError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # sources report their read errors as SourceError: this is the writing
        print(f"error: cannot write the tokenizer to {args.output}: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}: vocab {vocab_size(tok)}, special ids {special_ids(tok)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
