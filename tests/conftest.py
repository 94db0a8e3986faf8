"""Helpers shared by tests: the environment of in-process process groups and training subprocesses, the
kernels' backend switch, and a small token cache to pretrain on."""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import torch

# Without CUDA the Triton kernels run on CPU tensors under Triton's interpreter. Set before any test module is
# collected: a module that imports triton first (the compile and census tests do) would otherwise leave triton's own
# jit functions uninterpreted, and the kernel tests collected after it would fail.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Real text where ../shared/data is present (CI, this project's machines); made text elsewhere.
SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "corpus" / "tinyshakespeare" / "input.txt"

# Set by a launcher, or by electra_ds.train.engine.setup_distributed for a one-process world in this process.
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@contextmanager
def saved_environ() -> Iterator[None]:
    """Put os.environ back as it was, whatever the body set."""
    saved = dict(os.environ)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


@pytest.fixture
def restore_environ() -> Iterator[None]:
    with saved_environ():
        yield


def child_env(**extra: str) -> dict[str, str]:
    """The environment for a training subprocess: this process's, minus its own process-group variables (a child
    reusing MASTER_PORT would collide with this process's store), on the CPU accelerator, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    env.update(DS_ACCELERATOR="cpu", **extra)
    return env


@pytest.fixture
def triton_backend() -> Iterator[None]:
    """The Triton kernels forced for the test (CPU tensors need TRITON_INTERPRET=1), "auto" again after it."""
    from model_helpers import kernel_backend

    with kernel_backend("triton"):
        yield


def made_text() -> str:
    """About 400 paragraphs of made-up words: the corpus where ../shared/data is absent."""
    rng = np.random.default_rng(0)
    words = [f"{a}{b}" for a in ("ka", "lo", "mi", "nu", "pe", "ro", "su", "ta") for b in ("n", "s", "t", "", "r")]
    paras = []
    for _ in range(400):
        sentence = " ".join(words[i] for i in rng.integers(0, len(words), size=rng.integers(20, 60)))
        paras.append(sentence.capitalize() + ".")
    return "\n\n".join(paras)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """A token cache with a 1000-token vocabulary of the first 300 kB of tinyshakespeare (or of `made_text`)."""
    from electra_ds.data.cache import ensure_cache

    root = tmp_path_factory.mktemp("corpus")
    text = SHAKESPEARE.read_text()[:300_000] if SHAKESPEARE.is_file() else made_text()
    (root / "text.txt").write_text(text)
    return ensure_cache(str(root / "text.txt"), root / "caches", vocab_size=1000, doc_split="blank_lines",
                        workers=1, progress=False)
