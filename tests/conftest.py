"""Helpers shared by tests: the environment of in-process process groups and training subprocesses, and the
kernels' backend switch."""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

import pytest

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
    from electra_ds import kernels

    kernels.set_backend("triton")
    yield
    kernels.set_backend("auto")
