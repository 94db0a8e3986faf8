#!/usr/bin/env python
"""Tokenize a corpus into a sharded token cache, or verify one.

    python launch/build_cache.py --source builtin --output caches/builtin            # runs anywhere, offline
    python launch/build_cache.py --source ../shared/data/corpus/gutenberg --strip_gutenberg --output caches/gb
    python launch/build_cache.py --source openwebtext --tokenizer bert-uncased/ --output caches/owt --workers 16
    python launch/build_cache.py --verify caches/owt

SOURCE is 'builtin' (English text shipped with Python), local .txt/.txt.gz/.jsonl/.jsonl.gz/.parquet files or
folders, or a Hugging Face dataset name (default openwebtext; needs `datasets` and internet). Without
--tokenizer a WordPiece tokenizer is trained on the source and stored with the cache. An interrupted build
resumes when run again with the same arguments; the cache is complete once manifest.json exists.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys

from electra_ds.data.cache import DEFAULT_SHARD_TOKENS, MANIFEST, CacheError, build_cache, verify_cache
from electra_ds.data.sources import SourceError, add_source_arguments, source_options
from electra_ds.data.tokenizer import TokenizerError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", default="openwebtext", help="builtin, files/folders, or a Hugging Face dataset")
    p.add_argument("--output", help="cache directory to build (or resume)")
    p.add_argument("--verify", metavar="CACHE", help="re-check every shard of CACHE against its manifest")
    p.add_argument("--tokenizer", help="tokenizer dir, tokenizer.json or vocab.txt (default: train one)")
    p.add_argument("--vocab_size", type=int, default=30522, help="vocabulary of the tokenizer trained without "
                   "--tokenizer")
    p.add_argument("--workers", type=int, help="tokenizing processes (1: in this process; default: all cores, or 1 for "
                   "builtin and local sources under 32 MB)")
    p.add_argument("--shard_tokens", type=int, default=DEFAULT_SHARD_TOKENS, help="tokens per shard")
    p.add_argument("--heldout_fraction", type=float, default=0.005, help="share of documents held out for eval")
    p.add_argument("--dtype", choices=("uint16", "uint32"), help="token dtype (default: by vocab size)")
    add_source_arguments(p)
    p.add_argument("--tokenizer_sample_mb", type=float, default=256.0,
                   help="text used to train the tokenizer (without --tokenizer)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    if (args.output is None) == (args.verify is None):
        p.error("give exactly one of --output (build) or --verify CACHE")
    try:
        if args.verify:
            verify_cache(args.verify, progress=True)
            out = args.verify
        else:
            out = build_cache(args.source, args.output, args.tokenizer, args.workers, vocab_size=args.vocab_size,
                              shard_tokens=args.shard_tokens, heldout_fraction=args.heldout_fraction,
                              dtype=args.dtype, tokenizer_sample_mb=args.tokenizer_sample_mb,
                              **source_options(args))
    except (CacheError, SourceError, TokenizerError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    with open(f"{out}/{MANIFEST}") as f:
        manifest = json.load(f)
    splits = manifest["splits"]
    print(("verified" if args.verify else "built") + f" {out}: vocab {manifest['vocab_size']} "
          f"({manifest['dtype']}), " + ", ".join(
              f"{s} {v['tokens']:,} tokens / {v['documents']:,} documents / {len(v['shards'])} shards"
              for s, v in splits.items()))
    stats = manifest["source_stats"]
    if stats["invalid_utf8_replaced"]:
        print(f"note: {stats['invalid_utf8_replaced']} invalid UTF-8 sequences were replaced with U+FFFD in "
              f"{len(stats['files_with_invalid_utf8'])} file(s)")
    if stats.get("unsupported_files_skipped"):  # caches built before the count have no such key
        print(f"note: {stats['unsupported_files_skipped']} file(s) of unsupported type in the source folder were "
              "skipped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
