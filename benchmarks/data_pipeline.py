#!/usr/bin/env python
"""Data-path benchmark: token cache build against raw `tokenizers` batch encoding, and sampler throughput.

    python benchmarks/data_pipeline.py                                   # tiny shakespeare (or builtin)
    python benchmarks/data_pipeline.py --source ../shared/data/corpus/gutenberg --strip_gutenberg --workers 1,2,4

Build: the same text (read once from the source, chunked as the builder chunks it) is encoded by
`Tokenizer.encode_batch_fast` / `encode_batch` in this process (the tokenizer's own thread pool): that is
the tokenizer's own time. Then `build_cache` runs from scratch for each worker count (reading, tokenizing,
writing shards and manifest). Figures: MB of UTF-8 text per second, tokens per second, and the build's
time (and CPU time, which other load on the machine disturbs less) over the raw `encode_batch_fast` ones
(goal: at most 1.5).
Sampler: `SegmentSampler.batch` in one process (no DataLoader), for one segment, two segments and packed
windows, on the cache as built and on the same tokens cut into many shards. Figures: positions per second
(batch x max_length), real (non-pad) tokens per second, and positions per CPU second (the one-core figure
when other load shares the core; goal: at least 20 M/s).
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

from electra_ds.data.cache import BATCH_CHARS, TokenCache, build_cache
from electra_ds.data.sampler import SegmentSampler
from electra_ds.data.sources import add_source_arguments, open_source, source_options
from electra_ds.data.tokenizer import load_tokenizer, train_tokenizer
from electra_ds.files import atomic_write

DEFAULT_SOURCE = Path(__file__).resolve().parents[2] / "shared" / "data" / "corpus" / "tinyshakespeare"


def cpu_seconds() -> float:
    """CPU time of this process (all threads) and of its finished child processes."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def raw_encode(tok, texts: list[str], method: str) -> tuple[float, float, int]:
    """Wall seconds, CPU seconds and tokens to encode ``texts`` in batches of about BATCH_CHARS characters."""
    batches, batch, size = [], [], 0
    for text in texts:
        batch.append(text)
        size += len(text)
        if size >= BATCH_CHARS:
            batches.append(batch)
            batch, size = [], 0
    if batch:
        batches.append(batch)
    encode = getattr(tok, method)
    t0, c0 = time.perf_counter(), cpu_seconds()
    tokens = sum(len(e.ids) for b in batches for e in encode(b, add_special_tokens=False))
    return time.perf_counter() - t0, cpu_seconds() - c0, tokens


def time_sampler(cache: TokenCache, max_length: int, batch_size: int, seconds: float, **mode) -> dict:
    sampler = SegmentSampler(cache, max_length, batch_size, seed=0, **mode)
    for step in range(3):
        sampler.batch(step)
    steps, real, t0, c0 = 0, 0, time.perf_counter(), time.process_time()
    while (elapsed := time.perf_counter() - t0) < seconds:
        real += int(sampler.batch(steps)["attention_mask"].sum())
        steps += 1
    cpu = time.process_time() - c0
    return {"steps": steps, "positions_per_s": steps * batch_size * max_length / elapsed,
            "real_tokens_per_s": real / elapsed, "ms_per_batch": 1e3 * elapsed / steps,
            "positions_per_cpu_s": steps * batch_size * max_length / cpu}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", default=str(DEFAULT_SOURCE) if DEFAULT_SOURCE.exists() else "builtin")
    p.add_argument("--tokenizer", help="tokenizer to use (default: train one on the source)")
    p.add_argument("--vocab_size", type=int, default=30522)
    p.add_argument("--workers", default="1,2", help="comma-separated worker counts for the build")
    add_source_arguments(p)
    p.add_argument("--max_length", type=int, default=128)
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--sampler_seconds", type=float, default=2.0)
    p.add_argument("--many_shards", type=int, default=64, help="also time the sampler on this many shards")
    p.add_argument("--json", help="write the figures to this file")
    args = p.parse_args(argv)
    results: dict = {"source": args.source}
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        src = open_source(args.source, **source_options(args))
        texts = [text for text, _ in src.chunks()]
        mb = sum(len(t.encode("utf-8")) for t in texts) / 1e6
        tok_dir = args.tokenizer or train_tokenizer(iter(texts), args.vocab_size, tmp / "tokenizer")
        tok = load_tokenizer(tok_dir)
        print(f"source {args.source}: {mb:.2f} MB of text in {src.stats.documents} documents")

        raw = {}
        for method in ("encode_batch_fast", "encode_batch"):
            raw_encode(tok, texts[:64], method)  # warm the thread pool
            seconds, cpu, tokens = raw_encode(tok, texts, method)
            raw[method] = {"seconds": seconds, "cpu_seconds": cpu, "MB_per_s": mb / seconds,
                           "tokens_per_s": tokens / seconds}
            print(f"raw tokenizers {method:18s} {seconds:7.2f} s  {mb / seconds:7.2f} MB/s  "
                  f"{tokens / seconds / 1e6:6.2f} M tokens/s  cpu {cpu:6.2f} s")
        results["raw"] = raw
        base, base_cpu = raw["encode_batch_fast"]["seconds"], raw["encode_batch_fast"]["cpu_seconds"]

        results["build"] = {}
        cache_dir = None
        for run, workers in enumerate(int(w) for w in args.workers.split(",")):
            cache_dir = tmp / f"cache-{run}"
            t0, c0 = time.perf_counter(), cpu_seconds()
            build_cache(args.source, cache_dir, tok_dir, workers, progress=False, **source_options(args))
            seconds, cpu = time.perf_counter() - t0, cpu_seconds() - c0
            tokens = _total_tokens(cache_dir)
            results["build"][f"workers={workers}"] = {
                "seconds": seconds, "cpu_seconds": cpu, "MB_per_s": mb / seconds, "tokens_per_s": tokens / seconds,
                "x_raw": seconds / base, "x_raw_cpu": cpu / base_cpu}
            print(f"build_cache workers={workers:<2d}            {seconds:7.2f} s  {mb / seconds:7.2f} MB/s  "
                  f"{tokens / seconds / 1e6:6.2f} M tokens/s  cpu {cpu:6.2f} s  "
                  f"{seconds / base:5.2f}x raw time, {cpu / base_cpu:5.2f}x raw cpu (encode_batch_fast)")

        cache = TokenCache(cache_dir)
        sharded_dir = tmp / "cache-many"
        build_cache(args.source, sharded_dir, tok_dir, 1, progress=False, **source_options(args),
                    shard_tokens=max(1024, cache.num_tokens // args.many_shards))
        sharded = TokenCache(sharded_dir)
        results["sampler"] = {}
        for label, c in ((f"{len(cache.shards)} shard(s)", cache), (f"{len(sharded.shards)} shards", sharded)):
            for mode, kw in (("one segment", {}), ("two segments", {"two_segments": True}),
                             ("packed", {"pack": True})):
                r = time_sampler(c, args.max_length, args.batch_size, args.sampler_seconds, **kw)
                results["sampler"][f"{label}, {mode}"] = r
                print(f"sampler {label:>10s} {mode:12s} {r['ms_per_batch']:6.3f} ms/batch  "
                      f"{r['positions_per_s'] / 1e6:7.1f} M positions/s  "
                      f"{r['real_tokens_per_s'] / 1e6:7.1f} M real tokens/s  "
                      f"{r['positions_per_cpu_s'] / 1e6:7.1f} M positions/cpu-s")
    if args.json:
        atomic_write(args.json, json.dumps(results, indent=1) + "\n")
    return 0


def _total_tokens(cache_dir: Path) -> int:
    manifest = json.loads((cache_dir / "manifest.json").read_text())
    return sum(split["tokens"] for split in manifest["splits"].values())


if __name__ == "__main__":
    sys.exit(main())
