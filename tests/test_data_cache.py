"""Tokenizer, text sources and the sharded token cache: build, resume, verify, read, bad input."""
from __future__ import annotations

import gzip
import importlib.util
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from electra_ds.data import cache as cache_mod
from electra_ds.data.cache import CacheError, TokenCache, build_cache, dtype_for, ensure_cache, verify_cache
from electra_ds.data.sampler import SegmentSampler
from electra_ds.data.sources import SourceError, open_source
from electra_ds.data.tokenizer import (TokenizerError, load_tokenizer, special_ids, tokenizer_hash, train_tokenizer,
                                       vocab_size)
from electra_ds.files import TEMP_GLOB
from process_helpers import ended_within, needs_pidfd

WORDS = ("the of and to in a is that for it as was with be by on not he this are or his from at which but "
         "have an they you were her she there been one all we their has would when what if more no out so said "
         "who up them some could him into its then two time other only new about these may first any my now "
         "such like our over man me even most made after also did many before must through back years where "
         "much your way well down should because each just those people how too little state good very make "
         "world still own see men work long get here between both life being under never day same another "
         "know while last might us great old year off come since against go came right used take three").split()


def _document(rng: random.Random, n_sentences: int) -> str:
    sentences = []
    for _ in range(n_sentences):
        words = [rng.choice(WORDS) for _ in range(rng.randint(4, 14))]
        sentences.append(" ".join(words).capitalize() + rng.choice(".!?"))
    lines, line = [], []
    for s in sentences:  # wrap like a book
        line.append(s)
        if len(line) == 3:
            lines.append(" ".join(line))
            line = []
    lines.append(" ".join(line))
    return "\n".join(lines)


@pytest.fixture(scope="module")
def data_docs() -> list[str]:
    rng = random.Random(0)
    return [_document(rng, rng.randint(1, 40)) for _ in range(24)]


@pytest.fixture(scope="module")
def data_tokenizer(tmp_path_factory, data_docs) -> Path:
    return train_tokenizer(data_docs * 3, 300, tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def data_files(tmp_path_factory, data_docs) -> Path:
    """One document per file: plain and gzip-compressed .txt files in nested folders."""
    root = tmp_path_factory.mktemp("corpus")
    for i, doc in enumerate(data_docs):
        sub = root / f"part{i % 3}"
        sub.mkdir(exist_ok=True)
        if i % 2:
            with gzip.open(sub / f"doc{i:02d}.txt.gz", "wt", encoding="utf-8") as f:
                f.write(doc)
        else:
            (sub / f"doc{i:02d}.txt").write_text(doc, encoding="utf-8")
    return root


def _ordered_docs(root: Path, docs: list[str]) -> list[str]:
    """The documents in the source's order (sorted paths)."""
    names = sorted(str(p.relative_to(root)) for p in root.rglob("*.txt*"))
    return [docs[int(Path(n).name[3:5])] for n in names]


def _launch(name: str):
    """The ``main`` of a launch script."""
    path = Path(__file__).resolve().parents[1] / "launch" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"launch_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def _interrupted_build(source, out: Path, tokenizer, after: int = 0, **kwargs) -> None:
    """A build of `source` into `out` interrupted after writing `after` shards (an unfinished cache)."""
    flush, written = cache_mod._ShardWriter._flush, []

    def interrupted(writer, next_doc: int) -> None:
        if len(written) == after:
            raise KeyboardInterrupt
        written.append(next_doc)
        flush(writer, next_doc)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cache_mod._ShardWriter, "_flush", interrupted)
        with pytest.raises(KeyboardInterrupt):
            build_cache(source, out, tokenizer, **kwargs)


def _ids(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False).ids


# ------------------------------------------------------------------------------------------- tokenizer

def test_tokenizer_train_load_hash(data_tokenizer, tmp_path):
    tok = load_tokenizer(data_tokenizer)
    assert special_ids(tok) == {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4}
    assert 100 < vocab_size(tok) <= 300
    same = load_tokenizer(data_tokenizer / "tokenizer.json")
    assert tokenizer_hash(same) == tokenizer_hash(tok)
    from_vocab = load_tokenizer(data_tokenizer / "vocab.txt")  # BERT-style vocab.txt: uncased WordPiece
    text = "The WORLD was  Great, and the PEOPLE said so!"
    assert _ids(from_vocab, text) == _ids(tok, text)
    assert tok.encode(text).tokens[0] == "[CLS]" and tok.encode(text).tokens[-1] == "[SEP]"
    (tmp_path / "vocab.txt").write_text("hello\nworld\n")
    with pytest.raises(TokenizerError, match=r"\[PAD\]"):
        load_tokenizer(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(TokenizerError, match="no tokenizer.json or vocab.txt"):
        load_tokenizer(tmp_path / "empty")
    with pytest.raises(TokenizerError, match="tokenizer not found"):
        load_tokenizer(tmp_path / "missing.json")
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(TokenizerError, match="cannot load"):
        load_tokenizer(bad)


def test_vocab_txt_lines_end_at_newline_only(tmp_path):
    """\u2028, \x0c, \x85 ... inside a token are part of it (str.splitlines would cut there and shift later ids)."""
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a\u2028b", "c\x0cd", "e\x85f", "g\x1eh", "the", "world"]
    (tmp_path / "crlf.txt").write_bytes("\r\n".join(words).encode("utf-8") + b"\r\n")
    (tmp_path / "bare.txt").write_bytes("\n".join(words).encode("utf-8"))  # no final newline
    for name in ("crlf.txt", "bare.txt"):
        tok = load_tokenizer(tmp_path / name)
        assert [tok.token_to_id(w) for w in words] == list(range(len(words))) and vocab_size(tok) == len(words)


def _gapped_tokenizer(path: Path) -> Path:
    """A tokenizer.json whose ids have a gap: 7 tokens, the largest id 70000 (beyond uint16)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "[MASK]": 4, "world": 5, "the": 70_000}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path))
    return path


# ----------------------------------------------------------------------------------------- round trip

def test_round_trip_text_cache_windows(data_files, data_docs, data_tokenizer, tmp_path):
    tok = load_tokenizer(data_tokenizer)
    out = build_cache(data_files, tmp_path / "c", data_tokenizer, workers=1, shard_tokens=300,
                      heldout_fraction=0.0, progress=False)
    cache = TokenCache(out)
    expected = [_ids(tok, d) for d in _ordered_docs(data_files, data_docs)]
    # documents longer than a shard come back in shard-sized parts; joined in order they are the corpus
    stored = np.concatenate([cache.document(i) for i in range(cache.num_documents)])
    assert stored.tolist() == [i for doc in expected for i in doc]
    assert all(s["tokens"] <= 300 for s in cache.shards) and len(cache.shards) > 3
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["splits"]["train"]["documents"] == len(data_docs)
    assert cache.num_tokens == sum(map(len, expected))
    assert cache.dtype == np.uint16 and cache.vocab_size == vocab_size(tok)
    # windows decode to text of the corpus
    normalized = " ".join(tok.decode(d) for d in expected)
    sampler = SegmentSampler(cache, 24, 16, seed=3)
    batch = sampler.batch(0)
    for ids, mask in zip(batch["input_ids"], batch["attention_mask"]):
        n = int(mask.sum())
        assert ids[0] == tok.token_to_id("[CLS]") and ids[n - 1] == tok.token_to_id("[SEP]")
        window = tok.decode(ids[1:n - 1].tolist())
        assert window and window.split(" ", 1)[-1].rsplit(" ", 1)[0] in normalized


ORPHAN_SCRIPT = """
import multiprocessing, os, sys, time
from concurrent.futures import ProcessPoolExecutor
from tokenizers import Tokenizer, models
from electra_ds.data import cache

if __name__ == "__main__":
    tokenizer = Tokenizer(models.WordPiece({"[UNK]": 0}, unk_token="[UNK]")).to_str()
    pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"), initializer=cache._init_worker,
                               initargs=(tokenizer, os.getpid()))
    print(pool.submit(os.getpid).result(), flush=True)
    time.sleep(600)
"""


@needs_pidfd
def test_build_workers_end_with_a_killed_build(tmp_path):
    """A SIGKILLed build (no clean-up runs) takes its tokenizing workers with it instead of leaving them waiting."""
    script = tmp_path / "orphan.py"
    script.write_text(ORPHAN_SCRIPT)
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        worker = int(parent.stdout.readline())
        parent.kill()
        parent.wait()
        assert ended_within(worker, 20), "the worker outlived the killed build"
    finally:
        parent.kill()


def test_parallel_build_matches_in_process(data_files, data_tokenizer, tmp_path):
    one = build_cache(data_files, tmp_path / "w1", data_tokenizer, workers=1, shard_tokens=500, progress=False)
    two = build_cache(data_files, tmp_path / "w2", data_tokenizer, workers=2, shard_tokens=500, progress=False)
    m1, m2 = (json.loads((p / "manifest.json").read_text()) for p in (one, two))
    assert m1["splits"] == m2["splits"]


def test_heldout_split_by_documents(data_files, data_docs, data_tokenizer, tmp_path):
    tok = load_tokenizer(data_tokenizer)
    out = build_cache(data_files, tmp_path / "c", data_tokenizer, workers=1, heldout_fraction=0.1, progress=False)
    ordered = _ordered_docs(data_files, data_docs)
    heldout = TokenCache(out, "heldout")
    assert [heldout.document(i).tolist() for i in range(heldout.num_documents)] == [
        _ids(tok, ordered[i]) for i in (5, 15)]  # every 10th document, starting at 5
    train = TokenCache(out)
    assert train.num_documents == len(ordered) - 2
    assert cache_mod.heldout_period(0.005) == 200 and cache_mod.heldout_period(0.0) == 0


def test_heldout_fraction_above_half_refused_and_rounding_warned(caplog):
    for fraction in (0.6, 0.9, -0.1):
        with pytest.raises(ValueError, match=f"heldout_fraction must be between 0 and 0.5.*got {fraction}"):
            cache_mod.heldout_period(fraction)
    caplog.set_level("WARNING")
    assert [cache_mod.heldout_period(f) for f in (0.5, 0.1, 0.005, 0.0)] == [2, 10, 200, 0]
    assert not caplog.text  # 1 / period is the fraction asked for
    assert cache_mod.heldout_period(0.4) == 2 and "0.4 holds out 1 document in 2, i.e. 0.5" in caplog.text


def test_token_ids_beyond_the_vocab_count(tmp_path):
    tokenizer = _gapped_tokenizer(tmp_path / "gapped.json")
    assert vocab_size(load_tokenizer(tokenizer)) == 70_001  # the largest id + 1, not the 7 tokens
    (tmp_path / "src.txt").write_text("the world the")
    kwargs = dict(workers=1, heldout_fraction=0, progress=False)
    cache = TokenCache(build_cache(tmp_path / "src.txt", tmp_path / "c", tokenizer, **kwargs))
    assert cache.dtype == np.uint32 and cache.vocab_size == 70_001
    assert cache.document(0).tolist() == [70_000, 5, 70_000]
    verify_cache(cache.path)


def test_default_workers_are_the_cores_this_process_may_use(monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    assert cache_mod._default_workers(open_source("openwebtext")) == 3  # a large source: not the small-source 1


# --------------------------------------------------------------------------------------------- resume

def test_interrupted_build_resumes_without_redoing_shards(data_files, data_tokenizer, tmp_path, monkeypatch):
    kwargs = dict(workers=1, shard_tokens=200, heldout_fraction=0.1, progress=False)
    clean = build_cache(data_files, tmp_path / "clean", data_tokenizer, **kwargs)
    out = tmp_path / "c"
    _interrupted_build(data_files, out, data_tokenizer, after=4, **kwargs)
    assert not (out / "manifest.json").exists()
    with pytest.raises(CacheError, match="unfinished"):
        TokenCache(out)
    done = {p.name: p.stat().st_mtime_ns for p in out.glob("*-*.bin")}
    assert len(done) == 4
    (out / ".train-00004.bin.123.abcd.tmp.bin").write_bytes(b"half")  # what a killed writer leaves
    (out / ".tokenizer.x1y2.tmp").mkdir()
    encoded = []
    real_encode = cache_mod._encode
    monkeypatch.setattr(cache_mod, "_encode", lambda tok, texts: encoded.extend(texts) or real_encode(tok, texts))
    build_cache(data_files, out, data_tokenizer, **kwargs)
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*-*.bin") if p.name in done} == done
    total = sum(len(t) for t, _ in open_source(data_files).chunks())
    assert 0 < sum(map(len, encoded)) < total  # finished shards' documents were not tokenized again
    m_clean, m_resumed = (json.loads((p / "manifest.json").read_text()) for p in (clean, out))
    assert m_clean["splits"] == m_resumed["splits"]
    assert not (out / "build_state.json").exists() and not list(out.glob(TEMP_GLOB))
    verify_cache(out)
    # a different setting does not silently continue or overwrite
    with pytest.raises(CacheError, match="shard_tokens"):
        build_cache(data_files, out, data_tokenizer, **{**kwargs, "shard_tokens": 300})


def test_resume_after_every_possible_interruption(data_files, data_tokenizer, tmp_path):
    kwargs = dict(workers=1, shard_tokens=150, heldout_fraction=0.2, progress=False)
    clean = json.loads((build_cache(data_files, tmp_path / "clean", data_tokenizer, **kwargs)
                        / "manifest.json").read_text())
    n_shards = sum(len(v["shards"]) for v in clean["splits"].values())
    for stop in range(n_shards):
        out = tmp_path / f"c{stop}"
        _interrupted_build(data_files, out, data_tokenizer, after=stop, **kwargs)
        resumed = json.loads((build_cache(data_files, out, data_tokenizer, **kwargs) / "manifest.json").read_text())
        assert resumed["splits"] == clean["splits"], stop


def test_interrupted_tokenizer_save_leaves_no_partial_folder(data_files, data_tokenizer, tmp_path, monkeypatch):
    from electra_ds.data import tokenizer as tokenizer_mod

    write = tokenizer_mod.atomic_write

    def interrupted(path, data):
        if Path(path).name == "vocab.txt":  # after tokenizer.json
            raise KeyboardInterrupt
        write(path, data)

    monkeypatch.setattr(tokenizer_mod, "atomic_write", interrupted)
    out = tmp_path / "c"
    kwargs = dict(workers=1, progress=False)
    with pytest.raises(KeyboardInterrupt):
        build_cache(data_files, out, data_tokenizer, **kwargs)
    assert (out / "build_state.json").is_file() and not (out / "tokenizer").exists()
    monkeypatch.setattr(tokenizer_mod, "atomic_write", write)
    build_cache(data_files, out, data_tokenizer, **kwargs)
    assert sorted(p.name for p in (out / "tokenizer").iterdir()) == ["tokenizer.json", "tokenizer_config.json",
                                                                       "vocab.txt"]
    verify_cache(out)


_HOLD_LOCK = ("import fcntl, sys\n"
              "f = open(sys.argv[1], 'a')\n"
              "fcntl.flock(f, fcntl.LOCK_EX)\n"
              "print('locked', flush=True)\n"
              "sys.stdin.read()\n")


def test_second_builder_refused_while_the_first_holds_the_lock(data_files, data_tokenizer, tmp_path):
    out = tmp_path / "c"
    kwargs = dict(workers=1, shard_tokens=100, progress=False)
    _interrupted_build(data_files, out, data_tokenizer, **kwargs)
    in_flight = out / ".train-00000.bin.99.abcd.tmp.bin"  # what the other builder is writing now
    in_flight.write_bytes(b"half")
    other = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(out / ".build.lock")], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout.readline() == "locked\n"
        with pytest.raises(CacheError, match="another process is building"):
            build_cache(data_files, out, data_tokenizer, **kwargs)
        assert in_flight.exists() and not (out / "manifest.json").exists()
    finally:
        other.communicate("")  # it exits, and its lock goes with it
    build_cache(data_files, out, data_tokenizer, **kwargs)  # now resumes the build
    assert not in_flight.exists() and (out / ".build.lock").exists()
    verify_cache(out)
    assert build_cache(data_files, out, data_tokenizer, **kwargs) == out  # a finished cache is reused
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(CacheError, match="not empty"):
        build_cache(data_files, busy, data_tokenizer, **kwargs)
    assert not (busy / ".build.lock").exists()  # no lock file left in a folder that is not a cache


def test_builder_that_just_began_refuses_by_its_lock(data_files, data_tokenizer, tmp_path):
    """The other builder holds the lock and is writing its first build state: the folder is a build, not
    someone's files."""
    out = tmp_path / "c"
    out.mkdir()
    (out / ".build_state.json.99.abcd.tmp.json").write_text("{")  # its atomic write, not yet renamed
    other = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(out / ".build.lock")], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout.readline() == "locked\n"
        with pytest.raises(CacheError, match="another process is building"):
            build_cache(data_files, out, data_tokenizer, workers=1, progress=False)
    finally:
        other.communicate("")
    cache_mod._check_output(out)  # a finished cache is one too (the other builder may finish just before)
    (out / "manifest.json").write_text("{}")
    (out / "train-00000.bin").write_bytes(b"")
    cache_mod._check_output(out)


def test_build_that_wrote_no_shard_starts_afresh_with_new_settings(data_files, data_tokenizer, tmp_path):
    """A build that failed before its first shard (a typo'd source, a bad record) is no reason to refuse the
    corrected command; once a shard is written, other settings are refused."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": oops}\n')
    kwargs = dict(workers=1, heldout_fraction=0, progress=False)
    for tokenizer in (data_tokenizer, None):  # fails in tokenizing (tokenizer stored) / in training one
        out = tmp_path / f"c{tokenizer is None}"
        with pytest.raises(SourceError, match="bad.jsonl:1: not valid JSON"):
            build_cache(bad, out, tokenizer, vocab_size=200, **kwargs)
        assert (out / "build_state.json").is_file()
        built = build_cache(data_files, out, tokenizer, vocab_size=200, **kwargs)
        cache = TokenCache(built)
        assert cache.num_documents == 24 and json.loads((out / "manifest.json").read_text())[
            "settings"]["source"] == str(data_files)
    out = tmp_path / "partial"
    _interrupted_build(data_files, out, data_tokenizer, shard_tokens=100, **kwargs)
    build_cache(data_files, out, data_tokenizer, shard_tokens=200, **kwargs)  # no shard written: restarts
    assert max(s["tokens"] for s in TokenCache(out).shards) > 100
    out = tmp_path / "one_shard"
    _interrupted_build(data_files, out, data_tokenizer, after=1, shard_tokens=100, **kwargs)
    with pytest.raises(CacheError, match="built with other settings.*shard_tokens"):
        build_cache(data_files, out, data_tokenizer, shard_tokens=200, **kwargs)


# ------------------------------------------------------------------------------------ verify / corrupt

def test_verify_catches_flipped_byte_and_truncation(data_files, data_tokenizer, tmp_path):
    out = build_cache(data_files, tmp_path / "c", data_tokenizer, workers=1, shard_tokens=400, progress=False)
    verify_cache(out)
    shard = out / "train-00002.bin"
    data = bytearray(shard.read_bytes())
    data[7] ^= 0x01
    shard.write_bytes(bytes(data))
    TokenCache(out)  # sizes still match: only the checksum can tell
    with pytest.raises(CacheError, match="shard train-00002: checksum"):
        verify_cache(out)
    shard.write_bytes(bytes(data[:-2]))
    with pytest.raises(CacheError, match="shard train-00002: .*truncated"):
        TokenCache(out)
    (out / "train-00002.bin").unlink()
    with pytest.raises(CacheError, match="shard train-00002: .*missing"):
        verify_cache(out)


def test_tokenizer_mismatch_refused(data_files, data_docs, data_tokenizer, tmp_path):
    other = train_tokenizer(data_docs, 200, tmp_path / "other")
    out = build_cache(data_files, tmp_path / "c", data_tokenizer, workers=1, progress=False)
    with pytest.raises(CacheError, match="built with tokenizer"):
        ensure_cache(str(out), tmp_path / "root", str(other))
    with pytest.raises(CacheError, match="built with tokenizer"):
        TokenCache(out).check_tokenizer(load_tokenizer(other))
    with pytest.raises(CacheError, match="built with tokenizer"):
        build_cache(data_files, out, other, workers=1, progress=False)
    assert ensure_cache(str(out), tmp_path / "root", str(data_tokenizer)) == out
    # a partial build continued with another tokenizer
    partial = tmp_path / "partial"
    kwargs = dict(workers=1, shard_tokens=100, progress=False)
    _interrupted_build(data_files, partial, data_tokenizer, **kwargs)
    with pytest.raises(CacheError, match="another tokenizer"):
        build_cache(data_files, partial, other, **kwargs)
    with pytest.raises(CacheError, match="unfinished"):
        ensure_cache(str(partial), tmp_path / "root")
    # the cache's own tokenizer replaced behind its back
    (out / "tokenizer" / "tokenizer.json").write_text((other / "tokenizer.json").read_text())
    with pytest.raises(CacheError, match="tokenizer was replaced"):
        TokenCache(out)
    (out / "tokenizer" / "tokenizer.json").unlink()  # vocab.txt is still there, but is not what was stored
    with pytest.raises(CacheError, match="tokenizer.json is missing"):
        TokenCache(out)


def test_ensure_cache_keys_and_reuses(data_files, data_tokenizer, tmp_path, monkeypatch):
    root = tmp_path / "caches"
    first = ensure_cache(str(data_files), root, str(data_tokenizer), workers=1, progress=False)
    mtime = (first / "manifest.json").stat().st_mtime_ns
    again = ensure_cache(str(data_files), root, str(data_tokenizer), workers=1, progress=False)
    assert again == first and (first / "manifest.json").stat().st_mtime_ns == mtime
    other = ensure_cache(str(data_files), root, str(data_tokenizer), workers=1, progress=False, shard_tokens=100)
    assert other != first and other.parent == root
    assert ensure_cache(str(first), root) == first  # a built cache passes through
    tokens = TokenCache(first).num_tokens
    monkeypatch.setattr(cache_mod, "FORMAT_VERSION", cache_mod.FORMAT_VERSION + 1)  # a new format: a new folder
    newer = ensure_cache(str(data_files), root, str(data_tokenizer), workers=1, progress=False)
    assert newer not in (first, other) and TokenCache(newer).num_tokens == tokens


# ------------------------------------------------------------------------------------------ bad input

def test_special_token_text_in_the_corpus_is_words(tmp_path, data_tokenizer):
    """A web page that says "[SEP]" or "[MASK]" must not put a separator or a mask token into the cache."""
    (tmp_path / "src.txt").write_text("the world [SEP] was [MASK] great [CLS] and [PAD] good [UNK]")
    cache = TokenCache(build_cache(tmp_path / "src.txt", tmp_path / "c", data_tokenizer, workers=1,
                                   heldout_fraction=0, progress=False))
    tokens = cache.document(0).tolist()
    specials = special_ids(load_tokenizer(data_tokenizer))
    assert not set(tokens) & {specials[k] for k in ("pad", "cls", "sep", "mask")}
    assert len(tokens) > 8  # the bracketed words are there, as pieces


def test_bad_sources(tmp_path, data_tokenizer):
    with pytest.raises(SourceError, match="not found"):
        build_cache(tmp_path / "nope.txt", tmp_path / "c", data_tokenizer, progress=False)
    with pytest.raises(SourceError, match="not found"):
        open_source("./missing/folder")
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(SourceError, match="unsupported file type"):
        open_source(tmp_path / "data.csv")
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    with pytest.raises(SourceError, match="no .txt"):
        open_source(empty_dir)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n\n{"text": oops}\n')
    with pytest.raises(SourceError, match=r"bad.jsonl:3: not valid JSON"):
        list(open_source(bad).chunks())
    bad.write_text('{"body": "x"}\n')
    with pytest.raises(SourceError, match=r"bad.jsonl:1: no string field 'text'"):
        list(open_source(bad).chunks())
    broken = tmp_path / "broken.txt.gz"
    broken.write_bytes(gzip.compress(b"hello world " * 1000)[:-30])
    with pytest.raises(SourceError, match="broken.txt.gz: cannot read"):
        list(open_source(broken).chunks())
    if os.geteuid() != 0:  # root reads anything
        locked = tmp_path / "locked.txt"
        locked.write_text("secret")
        locked.chmod(0)
        with pytest.raises(SourceError, match="not readable"):
            open_source(locked)


def test_null_text_is_an_empty_document_other_types_are_refused(tmp_path, monkeypatch):
    jsonl = tmp_path / "n.jsonl"
    jsonl.write_text('{"text": "the world"}\n{"text": null}\n{"text": 7}\n')
    with pytest.raises(SourceError, match=r"n.jsonl:3: field 'text' holds int 7, not text .*--text_field"):
        list(open_source(jsonl).chunks())
    jsonl.write_text('{"text": "the world"}\n{"text": null}\n')
    src = open_source(jsonl)
    assert list(src.chunks()) == [("the world", True), ("", True)] and src.stats.null_texts == 1
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"text": ["the world", None], "id": [1, 2]}), tmp_path / "t.parquet")
    src = open_source(tmp_path / "t.parquet")
    assert list(src.chunks()) == [("the world", True), ("", True)] and src.stats.null_texts == 1
    with pytest.raises(SourceError, match=r"t.parquet row 1: field 'id' holds int 1, not text"):
        list(open_source(tmp_path / "t.parquet", text_field="id").chunks())
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets, "load_dataset", lambda name, config=None, split="train": datasets.Dataset.from_dict(
        {"text": ["the world", None], "id": [1, 2]}))
    src = open_source("openwebtext")
    assert list(src.chunks()) == [("the world", True), ("", True)] and src.stats.null_texts == 1
    with pytest.raises(SourceError, match=r"dataset openwebtext\[0\]: field 'id' holds int 1, not text"):
        list(open_source("openwebtext", text_field="id").chunks())


def test_parquet_without_pyarrow_says_what_to_install(tmp_path, monkeypatch):
    (tmp_path / "t.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # import fails as if pyarrow were not installed
    with pytest.raises(SourceError, match=r"t.parquet: reading .parquet files needs `pip install pyarrow`"):
        list(open_source(tmp_path / "t.parquet").chunks())


def test_dtype_and_output_checks(tmp_path, data_files, data_tokenizer):
    assert dtype_for(30522) == "uint16" and dtype_for(65536) == "uint16" and dtype_for(65537) == "uint32"
    with pytest.raises(CacheError, match="does not fit uint16"):
        dtype_for(70000, "uint16")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(CacheError, match="not empty"):
        build_cache(data_files, busy, data_tokenizer, workers=1, progress=False)
    with pytest.raises(CacheError, match="not a token cache"):
        TokenCache(busy)
    with pytest.raises(CacheError, match="inside the source folder"):
        build_cache(data_files, data_files / "cache", data_tokenizer, workers=1, progress=False)
    out = build_cache(data_files, tmp_path / "c32", data_tokenizer, workers=1, dtype="uint32", progress=False)
    assert TokenCache(out).dtype == np.uint32
    # a complete cache is returned only for the settings it was built with, dtype and tokenizer training included
    with pytest.raises(CacheError, match=r"dtype: 'uint32' there, None now"):
        build_cache(data_files, out, data_tokenizer, workers=1, progress=False)
    trained = build_cache(data_files, tmp_path / "trained", workers=1, vocab_size=200, progress=False)
    assert build_cache(data_files, trained, workers=1, vocab_size=200, progress=False) == trained
    with pytest.raises(CacheError, match="train_tokenizer: .*'vocab_size': 200.* there, .*'vocab_size': 300"):
        build_cache(data_files, trained, workers=1, vocab_size=300, progress=False)
    empty = tmp_path / "blank.txt"
    empty.write_text("\n\n   \n")
    with pytest.raises(CacheError, match="produced no tokens"):
        build_cache(empty, tmp_path / "none", data_tokenizer, workers=1, progress=False)
    assert not (tmp_path / "none" / "manifest.json").exists()


def test_empty_files_lines_and_invalid_utf8(tmp_path, data_tokenizer, caplog):
    tok = load_tokenizer(data_tokenizer)
    src = tmp_path / "src"
    src.mkdir()
    (src / "a_empty.txt").write_bytes(b"")
    (src / "b_lines.txt").write_bytes(b"\n\nthe world\n\n\n\nwas great\r\n\r\n   \n")
    (src / "c_latin1.txt").write_bytes("caf\xe9 and the world".encode("latin-1") + b" \xff\xfe end \xef\xbf\xbd")
    (src / "d.jsonl").write_bytes(b'{"text": ""}\n\n{"text": "she said \xe9 no"}\n')
    caplog.set_level("WARNING")
    out = build_cache(src, tmp_path / "c", data_tokenizer, workers=1, heldout_fraction=0, progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    stats = manifest["source_stats"]
    assert stats["invalid_utf8_replaced"] == 4  # \xe9, \xff, \xfe and the jsonl's \xe9; a real U+FFFD is kept
    assert len(stats["files_with_invalid_utf8"]) == 2 and "c_latin1.txt" in caplog.text
    train = manifest["splits"]["train"]
    assert train["empty_documents"] == 2 and train["documents"] == 3  # empty file and empty record
    cache = TokenCache(out)
    docs = [tok.decode(cache.document(i).tolist()) for i in range(cache.num_documents)]
    assert docs[0] == "the world was great"
    assert docs[1].startswith("caf") and "world" in docs[1] and "end" in docs[1]
    # blank-line documents: empty lines never make documents
    out2 = build_cache(src / "b_lines.txt", tmp_path / "c2", data_tokenizer, workers=1, heldout_fraction=0,
                       doc_split="blank_lines", progress=False)
    cache2 = TokenCache(out2)
    assert [tok.decode(cache2.document(i).tolist()) for i in range(cache2.num_documents)] == ["the world",
                                                                                               "was great"]


def test_lone_surrogate_replaced_and_counted(tmp_path, data_tokenizer, caplog):
    """JSON can spell a lone surrogate (half of a cut emoji); no tokenizer or UTF-8 encoder takes it."""
    src = tmp_path / "s.jsonl"
    src.write_text('{"text": "whole \\ud83d\\ude00 the world"}\n{"text": "cut \\ud83d x \\udc00"}\n'
                   '{"text": "was \\udead"}\n')
    caplog.set_level("WARNING")
    texts = list(open_source(src).texts())
    assert texts == ["whole \U0001f600 the world", "cut \ufffd x \ufffd", "was \ufffd"]
    assert caplog.text.count("lone surrogate") == 1 and "s.jsonl:2: lone surrogate" in caplog.text
    train_tokenizer(open_source(src).texts(), 100, tmp_path / "tok", min_frequency=1)
    out = build_cache(src, tmp_path / "c", data_tokenizer, workers=1, heldout_fraction=0, progress=False)
    stats = json.loads((out / "manifest.json").read_text())["source_stats"]
    assert stats["invalid_utf8_replaced"] == 3 and stats["files_with_invalid_utf8"] == [str(src)]


def test_folder_suffixes_in_any_case_and_unsupported_files_counted(tmp_path, caplog):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("a.txt", "B.TXT", "c.json", "d.txt.xz", "e.JSONL", "f.Txt.GZ"):
        (src / name).write_bytes(gzip.compress(b"the world") if name.endswith("GZ") else
                                 b'{"text": "was great"}' if name.endswith("JSONL") else b"the world")
    caplog.set_level("WARNING")
    source = open_source(src)
    assert [p.name for p in source.files] == ["B.TXT", "a.txt", "e.JSONL", "f.Txt.GZ"]
    assert "skipped 2 file(s) of unsupported type (c.json, d.txt.xz;" in caplog.text
    assert _documents(source) == ["the world", "the world", "was great", "the world"]
    assert source.stats.unsupported_files_skipped == 2
    assert open_source(src / "B.TXT").files == [src / "B.TXT"]
    empty = tmp_path / "only_csv"
    empty.mkdir()
    (empty / "x.csv").write_text("a,b\n")
    with pytest.raises(SourceError, match="no .txt"):
        open_source(empty)


def test_hidden_files_and_folders_skipped(tmp_path):
    root = tmp_path / ".corpus"  # the source folder itself may have any name
    (root / ".ipynb_checkpoints").mkdir(parents=True)
    (root / "sub" / ".git").mkdir(parents=True)
    (root / ".ipynb_checkpoints" / "a-checkpoint.txt").write_text("old draft")
    (root / "sub" / ".git" / "notes.txt").write_text("git")
    (root / ".hidden.txt").write_text("hidden")
    (root / "a.txt").write_text("the world")
    (root / "sub" / "b.txt").write_text("was great")
    assert _documents(open_source(root)) == ["the world", "was great"]


def test_blank_line_documents_do_not_depend_on_block_boundaries(tmp_path, monkeypatch):
    from electra_ds.data import sources

    paragraph = ("word " * 13105 + "the ending\n").encode()  # the first read ends inside the blank line
    assert len(paragraph) == sources.BLOCK_BYTES
    path = tmp_path / "b.txt"
    path.write_bytes(paragraph + b"\nSecond one.\n\nThird.")
    docs = _documents(open_source(path, doc_split="blank_lines"))
    assert docs == [paragraph.decode().rstrip("\n"), "Second one.", "Third."]
    rng = random.Random(1)
    pieces = ["word", "x", " ", "\n", "\n\n", "\n \n", "\n\t\n\n", "\n  ", "\x0c"]
    for _ in range(300):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 30)))
        path.write_text(text)
        expected = [d for d in sources._BLANK_LINES.split(text) if d.strip()]
        for block_bytes in (1, 2, 3, 5, 8):
            monkeypatch.setattr(sources, "BLOCK_BYTES", block_bytes)
            assert _documents(open_source(path, doc_split="blank_lines")) == expected, (text, block_bytes)


def _documents(source) -> list[str]:
    """The documents of ``source``, their chunks joined."""
    docs, text = [], ""
    for chunk, ends in source.chunks():
        text += chunk
        if ends:
            docs.append(text)
            text = ""
    return docs


def test_gutenberg_strip_jsonl_parquet(tmp_path, data_tokenizer):
    tok = load_tokenizer(data_tokenizer)
    book = ("\ufeffThe Project Gutenberg EBook of Nothing\r\nLicense blah\r\n"
            "*** START OF THIS PROJECT GUTENBERG EBOOK NOTHING ***\r\n\r\nthe world was great\r\n"
            "*** END OF THIS PROJECT GUTENBERG EBOOK NOTHING ***\r\nlicense and more license\r\n")
    src = tmp_path / "books"
    src.mkdir()
    with gzip.open(src / "book.txt.gz", "wt", encoding="utf-8", newline="") as f:
        f.write(book)
    (src / "plain.txt").write_text("no markers here")
    out = build_cache(src, tmp_path / "c", data_tokenizer, workers=1, heldout_fraction=0, strip_gutenberg=True,
                      progress=False)
    cache = TokenCache(out)
    assert [tok.decode(cache.document(i).tolist()) for i in range(2)] == ["the world was great",
                                                                          "no markers here"]
    assert json.loads((out / "manifest.json").read_text())["source_stats"]["gutenberg_without_markers"] == 1
    rows = [{"text": "the world", "id": 1}, {"text": "was great", "id": 2}]
    with gzip.open(tmp_path / "r.jsonl.gz", "wt") as f:
        f.write("\n".join(json.dumps(r) for r in rows))
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"body": ["she said no", None]}), tmp_path / "t.parquet")
    assert [t for t, _ in open_source(tmp_path / "r.jsonl.gz").chunks()] == ["the world", "was great"]
    # a record is stripped as a file is: the header up to START (an END line above it included), the licence
    (tmp_path / "g.jsonl").write_text(json.dumps({"text": "*** END OF LINE NOTE\n*** START OF X ***\nbody\n"
                                                          "*** END OF X ***\nlicence\n"}))
    assert [t for t, _ in open_source(tmp_path / "g.jsonl", strip_gutenberg=True).chunks()] == ["\nbody\n"]
    assert [t for t, _ in open_source(tmp_path / "t.parquet", text_field="body").chunks()] == ["she said no", ""]
    with pytest.raises(SourceError, match="no column 'text'"):
        list(open_source(tmp_path / "t.parquet").chunks())


def test_gutenberg_older_end_lines_and_books_without_end(tmp_path, caplog):
    head = "Header\n*** START OF THIS PROJECT GUTENBERG EBOOK X ***\nthe body, not the End of Project Gutenberg\n"
    books = {"a_end_line.txt": head + "End of the Project Gutenberg EBook of X\nlicence\n",
             "b_trailer.txt": head + "The Project Gutenberg Etext of X\nEnd of Project Gutenberg Etext X\n",
             "c_small_print.txt": head + "***START**THE SMALL PRINT!**FOR PUBLIC DOMAIN EBOOKS**START***\nlawyers\n",
             "d_no_end.txt": head + "licence\n",
             "e_unmarked.txt": "no markers\n",
             "f_old_etext.txt": "Header\n***START**THE SMALL PRINT!**\nlawyers\nCHAPTER I\nthe book\n"}
    src_dir = tmp_path / "books"
    src_dir.mkdir()
    for name, text in books.items():
        (src_dir / name).write_text(text)
    caplog.set_level("WARNING")
    src = open_source(src_dir, strip_gutenberg=True)
    body = "\nthe body, not the End of Project Gutenberg\n"
    assert [t for t, _ in src.chunks()] == [body, body + "The Project Gutenberg Etext of X\n", body,
                                            body + "licence\n", "no markers\n", books["f_old_etext.txt"]]
    # without a START marker only "*** END OF" ends a book: an old etext's licence may come before its text
    assert src.stats.gutenberg_without_end == 1 and src.stats.gutenberg_without_markers == 2
    assert "d_no_end.txt: no Gutenberg end marker" in caplog.text


def test_long_document_pieces_tokenize_like_the_whole(tmp_path, data_docs, data_tokenizer):
    tok = load_tokenizer(data_tokenizer)
    text = "\n".join(data_docs * 12)  # > 64 KB: read and tokenized in pieces cut at line breaks
    assert len(text) > 1 << 16
    (tmp_path / "long.txt").write_text(text)
    chunks = list(open_source(tmp_path / "long.txt").chunks())
    assert len(chunks) > 1 and [e for _, e in chunks] == [False] * (len(chunks) - 1) + [True]
    out = build_cache(tmp_path / "long.txt", tmp_path / "c", data_tokenizer, workers=1, progress=False)
    assert TokenCache(out).document(0).tolist() == _ids(tok, text)


def test_hub_dataset_source(monkeypatch, tmp_path, data_tokenizer):
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake_load(name, config=None, split="train"):
        calls.append((name, config, split))
        return datasets.Dataset.from_dict({"text": ["the world", "", "was great"], "url": ["a", "b", "c"]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    src = open_source("openwebtext")
    assert src.progress_total == 3  # known before reading, for the progress bar
    assert [c for c in src.chunks()] == [("the world", True), ("", True), ("was great", True)]
    assert len(calls) == 1  # loaded once
    out = build_cache("openwebtext", tmp_path / "c", data_tokenizer, workers=1, heldout_fraction=0, progress=False)
    assert TokenCache(out).num_documents == 2 and calls[0] == ("openwebtext", None, "train")
    book = "Header\n*** START OF X ***\nbody\n*** END OF X ***\nlicence\n"
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: datasets.Dataset.from_dict({"text": [book]}))
    assert list(open_source("gutenberg_books", strip_gutenberg=True).chunks()) == [("\nbody\n", True)]

    def offline(*args, **kwargs):
        raise ConnectionError("no internet")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(SourceError, match="cannot load Hugging Face dataset 'openwebtext'.*Offline"):
        list(open_source("openwebtext").chunks())


def test_builtin_corpus_and_cli(tmp_path, capsys):
    build_cache_main, train_tokenizer_main = _launch("build_cache"), _launch("train_tokenizer")
    chunks = list(open_source("builtin").chunks())
    text = "".join(t for t, _ in chunks)
    assert len(text) > 500_000 and sum(e for _, e in chunks) > 100 and " the " in text
    assert train_tokenizer_main(["--source", "builtin", "--vocab_size", "1000", "--output",
                                 str(tmp_path / "tok")]) == 0
    out = tmp_path / "cache"
    assert build_cache_main(["--source", "builtin", "--tokenizer", str(tmp_path / "tok"), "--output", str(out),
                             "--workers", "1", "--shard_tokens", "100000"]) == 0
    assert "built" in capsys.readouterr().out
    cache = TokenCache(out)
    assert cache.num_tokens > 100_000 and TokenCache(out, "heldout").num_documents >= 1
    assert build_cache_main(["--verify", str(out)]) == 0
    assert build_cache_main(["--source", str(tmp_path / "missing"), "--output", str(tmp_path / "x")]) == 2
    assert "error: source not found" in capsys.readouterr().err
    (tmp_path / "taken").write_text("a file")
    assert train_tokenizer_main(["--source", "builtin", "--output", str(tmp_path / "taken")]) == 2
    assert f"error: --output {tmp_path / 'taken'} exists and is not a directory" in capsys.readouterr().err
