"""Sharded binary token cache: build (parallel, resumable), verify, and read.

Layout of a cache directory::

    manifest.json            written last: its presence means the cache is complete
    build_state.json         only while a build is unfinished: finished shards and where to resume
    .build.lock              locked (flock) by the process building the cache; a second builder is refused
    tokenizer/               the tokenizer the ids come from (tokenizer.json, vocab.txt, ...)
    train-00000.bin          token ids, raw little-endian uint16 (uint32 when the vocab needs it)
    train-00000.idx          int64 offsets of the documents in the shard, plus the end (n_docs + 1 values)
    heldout-00000.bin/.idx   the held-out documents, same format

Token ids are stored without [CLS]/[SEP]; documents are whole unless one is longer than a shard, in which
case it is cut into shard-sized parts (each part then counts as a document of its shard). A shard holds at
most ``shard_tokens`` tokens; a document that does not fit the rest of the current shard starts the next.
Every file is written to a temporary name and renamed into place, and the build state is saved after every
shard, so an interrupted build resumes from its last finished shard and a partial cache never has a
manifest. Documents are numbered in source order; document ``i`` is held out when
``i % period == min(10, period // 2)`` with ``period = round(1 / heldout_fraction)``, so any corpus with
more than that many documents has at least one held-out document.

One process builds a cache folder at a time: a build holds an exclusive lock on ``.build.lock`` throughout, and
a second build of the same folder raises :class:`CacheError` at once instead of waiting (run it again once the
first has finished: a complete cache is then returned as is, an interrupted one resumed). The lock goes with the
process, so a killed builder never leaves the folder locked.
"""
from __future__ import annotations

import fcntl
import hashlib
import itertools
import json
import logging
import os
import re
import shutil
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from electra_ds.files import TEMP_GLOB, atomic_write, remove_stale_temps, replacing_dir
from electra_ds.lifetime import exit_with

from .sources import SOURCE_OPTIONS, Builtin, LocalFiles, Source, open_source
from .tokenizer import load_tokenizer, save_tokenizer, special_ids, text_tokenizer, tokenizer_hash, train_tokenizer
from .tokenizer import vocab_size as tokenizer_vocab_size

log = logging.getLogger(__name__)

FORMAT = "electra_ds.token_cache"
# 2: "[SEP]" etc. in the text are words; older Gutenberg end lines end a book. (Blank-line splitting stopped
# depending on where 64 KiB read blocks end without a new version: it moved few documents, a rebuild costs hours.)
FORMAT_VERSION = 2
MANIFEST = "manifest.json"
BUILD_STATE = "build_state.json"
BUILD_LOCK = ".build.lock"  # no temporary's name (files.TEMP_GLOB): stale-temp cleanup leaves it alone
TOKENIZER_DIR = "tokenizer"
SPLITS = ("train", "heldout")
DEFAULT_SHARD_TOKENS = 1 << 24
BATCH_CHARS = 1 << 20  # text per tokenizer call
SMALL_SOURCE_BYTES = 32 << 20  # below this, worker processes cost more to start than they save
_DTYPES = {"uint16": np.uint16, "uint32": np.uint32}


class CacheError(RuntimeError):
    """A cache is incomplete, corrupt, truncated, or does not match the tokenizer / settings asked for."""


# ----------------------------------------------------------------------------------------------- helpers

def _checksum(chunks: Iterable[bytes | memoryview]) -> str:
    digest = hashlib.blake2b(digest_size=16)
    for chunk in chunks:
        digest.update(chunk)
    return "blake2b:" + digest.hexdigest()


def _file_blocks(*paths: Path) -> Iterator[bytes]:
    """The files' bytes, concatenated, in blocks (a shard's checksum covers its .bin then its .idx)."""
    for path in paths:
        with open(path, "rb") as f:
            while block := f.read(1 << 22):
                yield block


def _write_json(path: Path, obj: dict) -> None:
    atomic_write(path, json.dumps(obj, indent=1) + "\n")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CacheError(f"cannot read {path}: {e}") from None


def dtype_for(vocab: int, dtype: str | None = None) -> str:
    """The storage dtype name for ids ``0 .. vocab - 1``; refuses a requested dtype that is too small."""
    name = dtype or ("uint16" if vocab <= 1 << 16 else "uint32")
    if name not in _DTYPES:
        raise CacheError(f"dtype must be one of {sorted(_DTYPES)}, got {name!r}")
    if vocab > int(np.iinfo(_DTYPES[name]).max) + 1:
        raise CacheError(f"vocab size {vocab} does not fit {name} (ids up to {np.iinfo(_DTYPES[name]).max}); "
                         "use uint32 or leave the dtype unset")
    return name


def heldout_period(fraction: float) -> int:
    """Every ``period``-th document is held out (0: none); warns when 1 / period is far from ``fraction``."""
    if not 0.0 <= fraction <= 0.5:
        raise ValueError(f"heldout_fraction must be between 0 and 0.5 (at most every 2nd document is held out), "
                         f"got {fraction}")
    if fraction == 0:
        return 0
    period = round(1 / fraction)
    if abs(1 / period - fraction) > 0.1 * fraction:
        log.warning("heldout_fraction %g holds out 1 document in %d, i.e. %.3g of them, not %g (the fraction is "
                    "rounded to 1 / a whole number)", fraction, period, 1 / period, fraction)
    return period


def _split_of(doc: int, period: int) -> str:
    return "heldout" if period and doc % period == min(10, period // 2) else "train"


# ----------------------------------------------------------------------------------------- tokenization

_worker_tokenizer = None


def _init_worker(tokenizer_json: str, parent: int) -> None:
    global _worker_tokenizer
    exit_with(parent)  # a killed build's workers would wait forever on a queue whose writing end they hold
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per worker process
    _worker_tokenizer = text_tokenizer(tokenizer_json)


def _encode(tok, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of each text (no special tokens), concatenated, and the per-text lengths."""
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)  # _fast (no offsets) since tokenizers 0.20
    encodings = encode(texts, add_special_tokens=False)
    ids = [e.ids for e in encodings]
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.uint32, count=int(lengths.sum()))
    return flat, lengths


def _encode_in_worker(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    return _encode(_worker_tokenizer, texts)


def _tokenized(batches: Iterator[tuple[list, list[str]]], tokenizer_json: str,
               workers: int) -> Iterator[tuple[list, np.ndarray, np.ndarray]]:
    """Tokenize batches in order; ``workers`` > 1 uses that many processes with a bounded queue."""
    if workers <= 1:
        tok = text_tokenizer(tokenizer_json)
        for meta, texts in batches:
            yield (meta, *_encode(tok, texts))
        return
    import multiprocessing

    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_init_worker, initargs=(tokenizer_json, os.getpid())) as pool:
        pending: deque = deque()
        try:
            for meta, texts in batches:
                pending.append((meta, pool.submit(_encode_in_worker, texts)))
                if len(pending) >= 2 * workers:
                    meta0, fut = pending.popleft()
                    yield (meta0, *fut.result())
            while pending:
                meta0, fut = pending.popleft()
                yield (meta0, *fut.result())
        finally:
            for _, fut in pending:
                fut.cancel()


# -------------------------------------------------------------------------------------------- writing

class _ShardWriter:
    """Packs the documents of one split into shards of at most ``shard_tokens`` tokens."""

    def __init__(self, root: Path, split: str, dtype: str, shard_tokens: int, state: dict, on_flush) -> None:
        self.root, self.split, self.shard_tokens = root, split, shard_tokens
        self.state, self.on_flush = state, on_flush
        self.buffer = np.empty(shard_tokens, dtype=_DTYPES[dtype])
        self.fill = 0
        self.starts: list[int] = []
        self.done_docs = self.done_empty = 0  # documents ended in the buffer, not yet in a finished shard
        self.resume_doc, self.skip = state["resume"]
        self.pending: list[np.ndarray] = []
        self.pending_len = self.pending_emitted = 0

    def add(self, doc: int, ids: np.ndarray, ends: bool) -> None:
        """Append one chunk of document ``doc`` (chunks arrive in order, documents in order)."""
        if doc == self.resume_doc and self.skip:  # tokens of this document already in finished shards
            dropped = min(self.skip, len(ids))
            ids, self.skip = ids[dropped:], self.skip - dropped
            self.pending_emitted += dropped
        if len(ids):
            self.pending.append(ids)
            self.pending_len += len(ids)
        while self.fill + self.pending_len > self.shard_tokens:
            if self.fill:  # the document does not fit beside the others: it starts the next shard
                self._flush(doc)
            else:  # longer than a whole shard: cut a shard-sized part
                self._place(self.shard_tokens)
                self._flush(doc)
        if ends:
            if self.pending_len:
                self._place(self.pending_len)
            if self.pending_emitted:
                self.done_docs += 1
            else:
                self.done_empty += 1
            self.pending_emitted = 0

    def _place(self, n: int) -> None:
        """Move the first ``n`` pending tokens into the shard buffer as (a part of) one document."""
        self.starts.append(self.fill)
        while n:
            head = self.pending[0]
            take = min(n, len(head))
            self.buffer[self.fill:self.fill + take] = head[:take]
            self.fill += take
            n -= take
            self.pending_len -= take
            self.pending_emitted += take
            if take == len(head):
                self.pending.pop(0)
            else:
                self.pending[0] = head[take:]

    def _flush(self, next_doc: int) -> None:
        """Write the buffer as the next shard; ``next_doc`` is the first document not wholly in it."""
        name = f"{self.split}-{len(self.state['shards']):05d}"
        starts = np.asarray(self.starts + [self.fill], dtype=np.int64).tobytes()
        tokens = memoryview(self.buffer[:self.fill]).cast("B")
        atomic_write(self.root / f"{name}.idx", starts)
        atomic_write(self.root / f"{name}.bin", tokens)
        checksum = _checksum((tokens, starts))
        self.state["shards"].append({"name": name, "tokens": int(self.fill), "documents": len(self.starts),
                                     "checksum": checksum})
        self.state["documents"] += self.done_docs
        self.state["empty_documents"] += self.done_empty
        self.state["resume"] = [next_doc, self.pending_emitted]
        self.fill, self.starts, self.done_docs, self.done_empty = 0, [], 0, 0
        self.on_flush()

    def finish(self, end_doc: int) -> None:
        if self.fill:
            self._flush(end_doc)
        else:  # nothing left to write, but empty documents at the end still count
            self.state["empty_documents"] += self.done_empty
            self.done_empty = 0


# ------------------------------------------------------------------------------------------- building

def _settings(source: Source, options: dict, *, shard_tokens: int, heldout_fraction: float, dtype: str | None,
              train_tokenizer: dict | None) -> dict:
    """Everything that decides the cache's content besides a given tokenizer (checked by its hash): the source, how
    it is read (`options`, keyed by SOURCE_OPTIONS) and the build settings; a tokenizer to train is decided by
    `train_tokenizer` (its vocab size and text sample)."""
    return {"format_version": FORMAT_VERSION, "source": source.spec, "source_fingerprint": source.fingerprint(),
            "shard_tokens": shard_tokens, "heldout_fraction": heldout_fraction, **options, "dtype": dtype,
            "train_tokenizer": train_tokenizer}


def _compare(expected: dict, found: dict, where: Path) -> None:
    diff = [k for k in sorted(set(expected) | set(found)) if expected.get(k) != found.get(k)]
    if diff:
        detail = "; ".join(f"{k}: {found.get(k)!r} there, {expected.get(k)!r} now" for k in diff)
        if diff == ["source_fingerprint"]:
            detail += (": the source's files changed since, or (same files) this version lists a folder differently, "
                       "leaving out hidden folders and reading suffixes in any case")
        raise CacheError(f"{where} was built with other settings ({detail}). Use the same settings, "
                         "another output directory, or delete it.")


def _check_output(out: Path) -> None:
    """Refuse an output that cannot hold a build: a file, or a folder with other things than a cache build.

    The lock file and temporaries are a build's too: another builder that has just begun (it holds the lock and
    is writing its first build state) is then refused by the lock, with a message saying so."""
    if out.exists() and not out.is_dir():
        raise CacheError(f"{out} exists and is not a directory")
    if not out.exists() or (out / BUILD_STATE).is_file() or (out / MANIFEST).is_file():
        return
    if any(p.name != BUILD_LOCK and not p.match(TEMP_GLOB) for p in out.iterdir()):
        raise CacheError(f"{out} is not empty and holds no token cache; choose a new or empty directory")


@contextmanager
def _build_lock(out: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``out/.build.lock`` (created if needed); refuse if another process holds it."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / BUILD_LOCK, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CacheError(f"another process is building {out} (it holds the lock {out / BUILD_LOCK}); wait "
                             "for it to finish and run again: the finished cache is then reused") from None
        yield  # closing the file releases the lock


def _finished_cache(out: Path, settings: dict, tokenizer: str | os.PathLike | None) -> Path:
    """A complete cache at ``out``, after checking it was built with these settings and this tokenizer."""
    _compare(settings, _read_json(out / MANIFEST).get("settings", {}), out)
    if tokenizer is not None:
        TokenCache(out).check_tokenizer(load_tokenizer(tokenizer))
    return out


def _obtain_tokenizer(out: Path, tokenizer: str | os.PathLike | None, source: Source, vocab: int,
                      sample_mb: float):
    """The tokenizer for this build, stored under ``out/tokenizer`` (trained on the source if none given)."""
    stored = out / TOKENIZER_DIR
    if tokenizer is not None:
        tok = load_tokenizer(tokenizer)
        if (stored / "tokenizer.json").is_file():
            if tokenizer_hash(load_tokenizer(stored)) != tokenizer_hash(tok):
                raise CacheError(f"{out} is being built with another tokenizer (stored in {stored}) than "
                                 f"{tokenizer}; use that one, or delete {out}")
        else:
            with replacing_dir(stored) as tmp:  # an interrupted save leaves no partial folder to resume with
                save_tokenizer(tok, tmp)
        return tok
    if not (stored / "tokenizer.json").is_file():
        log.info("training a %d-token WordPiece tokenizer on %s (up to %s MB of text)", vocab, source.spec,
                 sample_mb)
        with replacing_dir(stored) as tmp:
            train_tokenizer(source.texts(int(sample_mb * 1e6)), vocab, tmp)
    return load_tokenizer(stored)


def build_cache(source: str | os.PathLike, output: str | os.PathLike, tokenizer: str | os.PathLike | None = None,
                workers: int | None = None, *, vocab_size: int = 30522,
                shard_tokens: int = DEFAULT_SHARD_TOKENS, heldout_fraction: float = 0.005,
                dtype: str | None = None, doc_split: str = "file", strip_gutenberg: bool = False,
                text_field: str = "text", hf_config: str | None = None, hf_split: str = "train",
                tokenizer_sample_mb: float = 256.0, progress: bool = True) -> Path:
    """Tokenize ``source`` into a sharded cache at ``output`` and return its path.

    ``source`` is ``"builtin"``, local files/folders, or a Hugging Face dataset name (see
    :func:`electra_ds.data.sources.open_source`). Without ``tokenizer`` a WordPiece tokenizer of
    ``vocab_size`` tokens is trained on (up to ``tokenizer_sample_mb`` MB of) the source first.
    ``workers`` tokenizing processes (1: in this process, with the tokenizer's own threads; default: all
    cores this process may use, or 1 for the builtin corpus and local files under 32 MB). An unfinished build
    in ``output`` with the same settings is resumed (one that wrote no shard yet is started afresh if the settings
    changed); a complete one is returned as is. A build that another process is running in ``output`` raises
    :class:`CacheError`.
    """
    if shard_tokens < 1:
        raise ValueError(f"shard_tokens must be positive, got {shard_tokens}")
    period = heldout_period(heldout_fraction)
    options = {"doc_split": doc_split, "text_field": text_field, "strip_gutenberg": strip_gutenberg,
               "hf_config": hf_config, "hf_split": hf_split}  # SOURCE_OPTIONS
    src = open_source(source, **options)
    settings = _settings(src, options, shard_tokens=shard_tokens, heldout_fraction=heldout_fraction, dtype=dtype,
                         train_tokenizer=None if tokenizer is not None else {"vocab_size": vocab_size,
                                                                             "sample_mb": tokenizer_sample_mb})
    out = Path(output)
    if isinstance(src, LocalFiles) and out.resolve().is_relative_to(src.root) and src.root.is_dir():
        raise CacheError(f"the output {out} is inside the source folder {src.root}; put the cache elsewhere")
    if (out / MANIFEST).is_file():
        return _finished_cache(out, settings, tokenizer)
    _check_output(out)  # before the lock file goes into a folder that is not a cache
    with _build_lock(out):
        if (out / MANIFEST).is_file():  # another process finished it in the meantime
            return _finished_cache(out, settings, tokenizer)
        state = _read_json(out / BUILD_STATE) if (out / BUILD_STATE).is_file() else None
        if state is not None:
            remove_stale_temps(out)  # what the interrupted run was writing
            if state.get("settings") != settings:
                if _wrote_shards(state):
                    _compare(settings, state.get("settings", {}), out)  # raises: the shards are the old settings'
                # e.g. a source that failed to open, or a tokenizer training that failed: nothing to keep
                log.info("%s: an unfinished build with other settings wrote no shard; starting afresh", out)
                shutil.rmtree(out / TOKENIZER_DIR, ignore_errors=True)  # it may come from the old settings
                state = None
        if state is None:
            state = {"settings": settings, "tokenizer_hash": None,
                     "splits": {s: {"shards": [], "resume": [0, 0], "documents": 0, "empty_documents": 0}
                                for s in SPLITS}}
            _write_json(out / BUILD_STATE, state)

        tok = _obtain_tokenizer(out, tokenizer, src, vocab_size, tokenizer_sample_mb)
        special_ids(tok)  # refuse a tokenizer without the special tokens before tokenizing anything
        tok_hash, vocab = tokenizer_hash(tok), tokenizer_vocab_size(tok)  # vocab: largest id + 1
        if state["tokenizer_hash"] not in (None, tok_hash):
            raise CacheError(f"{out} holds a partial build made with tokenizer {state['tokenizer_hash']}, "
                             f"not {tok_hash}; use the same tokenizer or delete {out}")
        state.update(tokenizer_hash=tok_hash, vocab_size=vocab, dtype=dtype_for(vocab, dtype))
        _write_json(out / BUILD_STATE, state)

        n_workers = workers if workers is not None else _default_workers(src)
        _tokenize_into_shards(out, state, src, tok, period, n_workers, progress)
        return _write_manifest(out, state, src, tok)


def _wrote_shards(state: dict) -> bool:
    return any(split.get("shards") for split in state.get("splits", {}).values())


def _default_workers(src: Source) -> int:
    small = isinstance(src, Builtin) or isinstance(src, LocalFiles) and src.progress_total < SMALL_SOURCE_BYTES
    if small:
        return 1
    # the cores this process may run on (a job scheduler's or taskset's share), not all of the machine's
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _tokenize_into_shards(out: Path, state: dict, src: Source, tok, period: int, workers: int,
                          progress: bool) -> None:
    """Stream the source through the tokenizer into both splits' shards, resuming from ``state``."""
    writers = {s: _ShardWriter(out, s, state["dtype"], state["settings"]["shard_tokens"], state["splits"][s],
                               lambda: _write_json(out / BUILD_STATE, state)) for s in SPLITS}
    if any(w.resume_doc for w in writers.values()):  # the held-out split's first shard fills much later
        log.info("resuming %s: %d train and %d heldout shards already done", out,
                 len(state["splits"]["train"]["shards"]), len(state["splits"]["heldout"]["shards"]))
    from tqdm.auto import tqdm

    bar = tqdm(total=src.progress_total, unit=src.progress_unit, unit_scale=True, disable=not progress,
               desc=f"tokenizing {src.spec}")
    doc_count = [0]

    def batches() -> Iterator[tuple[list, list[str]]]:
        """Batches of chunk texts with (document, ends, split) of each; finished documents left out."""
        meta, texts, size, doc = [], [], 0, 0
        for text, ends in src.chunks(bar.update):
            split = _split_of(doc, period)
            if doc >= writers[split].resume_doc:
                meta.append((doc, ends, split))
                texts.append(text)
                size += len(text)
                if size >= BATCH_CHARS:
                    yield meta, texts
                    meta, texts, size = [], [], 0
            doc += ends
        doc_count[0] = doc
        if texts:
            yield meta, texts

    tokens = 0
    try:  # every id fits the dtype: dtype_for sized it by the tokenizer's largest id + 1
        for meta, flat, lengths in _tokenized(batches(), tok.to_str(), workers):
            offsets = np.concatenate(([0], np.cumsum(lengths)))
            for (doc, ends, split), a, b in zip(meta, offsets[:-1], offsets[1:]):
                writers[split].add(doc, flat[a:b], ends)
            tokens += int(offsets[-1])
            bar.set_postfix(tokens=f"{tokens / 1e6:.1f}M", refresh=False)
        for w in writers.values():
            w.finish(doc_count[0])
    finally:
        bar.close()


def _write_manifest(out: Path, state: dict, src: Source, tok) -> Path:
    splits = {}
    for split in SPLITS:
        s = state["splits"][split]
        splits[split] = {"tokens": sum(sh["tokens"] for sh in s["shards"]), "documents": s["documents"],
                         "empty_documents": s["empty_documents"], "shards": s["shards"]}
    if splits["train"]["tokens"] == 0:
        raise CacheError(f"source {src.spec} produced no tokens (is it empty?); {out} stays incomplete")
    manifest = {"format": FORMAT, "version": FORMAT_VERSION, "tokenizer_hash": state["tokenizer_hash"],
                "vocab_size": state["vocab_size"], "dtype": state["dtype"], "special_ids": special_ids(tok),
                "settings": state["settings"], "source_stats": src.stats.to_dict(), "splits": splits}
    stats = src.stats
    if stats.invalid_utf8_replaced:
        log.warning("%d invalid UTF-8 sequences replaced in %d file(s) (see source_stats in %s)",
                    stats.invalid_utf8_replaced, len(stats.files_with_invalid_utf8), out / MANIFEST)
    _write_json(out / MANIFEST, manifest)
    (out / BUILD_STATE).unlink()
    return out


def ensure_cache(source: str, cache_root: Path, tokenizer: str | None = None, **build_kwargs) -> Path:
    """A complete cache of ``source`` tokenized with ``tokenizer``: found under ``cache_root``, else built.

    ``source`` may be a built cache directory (returned as is, after checking ``tokenizer`` matches it).
    Caches are keyed by the source, its fingerprint, the tokenizer (its hash, or the size of the vocab to
    train) and the content-deciding build settings. Meant for a single builder (e.g. rank 0 while the
    other ranks wait at a barrier).
    """
    given = Path(source)
    if (given / MANIFEST).is_file() or (given / BUILD_STATE).is_file():
        cache = TokenCache(given)  # an unfinished build is refused with a message saying so
        if tokenizer is not None:
            cache.check_tokenizer(load_tokenizer(tokenizer))
        return given
    content = {k: v for k, v in build_kwargs.items() if k not in ("workers", "progress")}
    src = open_source(source, **{k: content[k] for k in SOURCE_OPTIONS if k in content})
    tok_key = (tokenizer_hash(load_tokenizer(tokenizer)) if tokenizer is not None
               else f"train:{content.get('vocab_size', 30522)}")
    key = json.dumps({"source": src.spec, "fingerprint": src.fingerprint(), "tokenizer": tok_key,
                      "format_version": FORMAT_VERSION, **content}, sort_keys=True, default=str)
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(src.spec).name or "source")[:40]
    out = Path(cache_root) / f"{slug}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    return build_cache(source, out, tokenizer, **build_kwargs)


# -------------------------------------------------------------------------------------------- reading

def _read_manifest(path: Path) -> dict:
    if not (path / MANIFEST).is_file():
        if (path / BUILD_STATE).is_file():
            raise CacheError(f"{path} is an unfinished cache build (no {MANIFEST}); rerun build_cache with "
                             "the same arguments to resume it")
        raise CacheError(f"{path} is not a token cache (no {MANIFEST})")
    manifest = _read_json(path / MANIFEST)
    if manifest.get("format") != FORMAT or manifest.get("version") != FORMAT_VERSION:
        raise CacheError(f"{path / MANIFEST}: format {manifest.get('format')!r} version "
                         f"{manifest.get('version')!r}, expected {FORMAT!r} version {FORMAT_VERSION}; rebuild it")
    dtype_for(manifest["vocab_size"], manifest["dtype"])
    return manifest


class TokenCache:
    """Read access to one split of a built cache: memory-mapped shards and a table of documents.

    Opening checks the manifest, the stored tokenizer and every shard's size and document index (a
    truncated shard is named); :func:`verify_cache` also checks contents against the checksums.
    """

    def __init__(self, path: str | os.PathLike, split: str = "train") -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.path, self.split = Path(path), split
        manifest = _read_manifest(self.path)
        self.vocab_size: int = manifest["vocab_size"]
        self.dtype = np.dtype(_DTYPES[manifest["dtype"]])
        self.special_ids: dict[str, int] = dict(manifest["special_ids"])
        self.tokenizer_hash: str = manifest["tokenizer_hash"]
        self.tokenizer_path = self.path / TOKENIZER_DIR
        _check_stored_tokenizer(self.path, manifest)
        self.shards: list[dict] = manifest["splits"][split]["shards"]
        if not self.shards:
            raise CacheError(f"{self.path} has no {split} documents"
                             + (" (raise heldout_fraction or add documents)" if split == "heldout" else ""))
        self._load_index()

    def _load_index(self) -> None:
        starts, lengths, shard_ids = [], [], []
        for i, shard in enumerate(self.shards):
            idx = _check_shard_files(self.path, shard, self.dtype)
            starts.append(idx[:-1])
            lengths.append(np.diff(idx))
            shard_ids.append(np.full(len(idx) - 1, i, dtype=np.int32))
        self.doc_start = np.concatenate(starts)
        self.doc_length = np.concatenate(lengths)
        self.doc_shard = np.concatenate(shard_ids)
        self.shard_length = np.array([s["tokens"] for s in self.shards], dtype=np.int64)
        self._maps: list[np.ndarray | None] = [None] * len(self.shards)

    def __getstate__(self) -> dict:  # workers map the shards again instead of receiving copies of them
        return {**self.__dict__, "_maps": [None] * len(self.shards)}

    @property
    def num_tokens(self) -> int:
        return int(self.shard_length.sum())

    @property
    def num_documents(self) -> int:
        """Documents (parts of documents cut at shard ends count separately) in this split."""
        return len(self.doc_start)

    def shard(self, i: int) -> np.ndarray:
        """Memory map of shard ``i``'s token ids."""
        mm = self._maps[i]
        if mm is None:  # a plain ndarray view of the map: indexing it skips np.memmap's Python overhead
            mm = self._maps[i] = np.memmap(self.path / f"{self.shards[i]['name']}.bin", dtype=self.dtype,
                                           mode="r", shape=(self.shards[i]["tokens"],)).view(np.ndarray)
        return mm

    def document(self, i: int) -> np.ndarray:
        """Token ids of document ``i`` of this split."""
        start = int(self.doc_start[i])
        return np.asarray(self.shard(int(self.doc_shard[i]))[start:start + int(self.doc_length[i])])

    def check_tokenizer(self, tok) -> None:
        """Refuse a tokenizer other than the one the cache was built with."""
        other = tokenizer_hash(tok)
        if other != self.tokenizer_hash:
            raise CacheError(f"{self.path} was built with tokenizer {self.tokenizer_hash}, not {other}: "
                             "token ids would not match; rebuild the cache with this tokenizer or use its "
                             f"own ({self.tokenizer_path})")


def _check_stored_tokenizer(root: Path, manifest: dict) -> None:
    if not (root / TOKENIZER_DIR / "tokenizer.json").is_file():  # else a vocab.txt beside it would stand in
        raise CacheError(f"{root / TOKENIZER_DIR / 'tokenizer.json'} is missing: the cache's tokenizer is "
                         "incomplete; restore it or rebuild the cache")
    stored = tokenizer_hash(load_tokenizer(root / TOKENIZER_DIR))
    if stored != manifest["tokenizer_hash"]:
        raise CacheError(f"{root / TOKENIZER_DIR} has hash {stored}, but {root / MANIFEST} says "
                         f"{manifest['tokenizer_hash']}: the cache's tokenizer was replaced; rebuild the cache")


def _check_shard_files(root: Path, shard: dict, dtype: np.dtype) -> np.ndarray:
    """Check a shard's file sizes and document index; return the index."""
    name = shard["name"]
    bin_path, idx_path = root / f"{name}.bin", root / f"{name}.idx"
    for path, expected in ((bin_path, shard["tokens"] * dtype.itemsize), (idx_path, (shard["documents"] + 1) * 8)):
        if not path.is_file():
            raise CacheError(f"shard {name}: {path} is missing; rebuild the cache")
        size = path.stat().st_size
        if size != expected:
            raise CacheError(f"shard {name}: {path.name} has {size} bytes, the manifest says {expected} "
                             "(truncated or corrupt); rebuild the cache")
    idx = np.fromfile(idx_path, dtype=np.int64)
    if idx[0] != 0 or idx[-1] != shard["tokens"] or np.any(np.diff(idx) <= 0):
        raise CacheError(f"shard {name}: {idx_path.name} is not a valid document index (corrupt); "
                         "rebuild the cache")
    return idx


def verify_cache(path: str | os.PathLike, progress: bool = False) -> None:
    """Re-check every shard of both splits against the manifest (sizes, index, checksums, id range).

    Raises :class:`CacheError` naming the first bad shard.
    """
    root = Path(path)
    manifest = _read_manifest(root)
    dtype = np.dtype(_DTYPES[manifest["dtype"]])
    _check_stored_tokenizer(root, manifest)
    shards = [s for split in SPLITS for s in manifest["splits"][split]["shards"]]
    from tqdm.auto import tqdm

    for shard in tqdm(shards, desc="verifying", unit="shard", disable=not progress):
        _check_shard_files(root, shard, dtype)
        name = shard["name"]
        if _checksum(_file_blocks(root / f"{name}.bin", root / f"{name}.idx")) != shard["checksum"]:
            raise CacheError(f"shard {name}: checksum mismatch (corrupt); rebuild the cache")
        tokens = np.memmap(root / f"{name}.bin", dtype=dtype, mode="r")
        for begin in range(0, len(tokens), 1 << 24):
            top = int(tokens[begin:begin + (1 << 24)].max())
            if top >= manifest["vocab_size"]:
                raise CacheError(f"shard {name}: token id {top} outside the vocabulary "
                                 f"({manifest['vocab_size']})")

