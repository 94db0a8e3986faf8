"""Watching processes that a test started (Linux /proc)."""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

needs_pidfd = pytest.mark.skipif(not hasattr(os, "pidfd_open"), reason="workers watch their process through a pidfd")


def running(pid: int) -> bool:
    """Whether process `pid` is alive (an unreaped zombie has ended: only its parent's wait is missing)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def ended_within(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while running(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not running(pid)
