"""Helper processes (data loader and tokenizing workers) that end when the process they serve ends."""
from __future__ import annotations

import os
import select
import threading


def exit_with(pid: int) -> None:
    """End this process as soon as process `pid` has exited, however it ended (SIGKILL included): a daemon thread
    waits on its pidfd (Linux >= 5.3; elsewhere nothing is watched). Unlike PR_SET_PDEATHSIG this follows `pid`
    itself, not this process's parent: under forkserver the parent is the forkserver, which outlives `pid`."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        os._exit(1)  # gone already
    except (AttributeError, OSError):
        return  # no pidfd on this system
    threading.Thread(target=_exit_when_readable, args=(pidfd,), name=f"exit-with-{pid}", daemon=True).start()


def _exit_when_readable(pidfd: int) -> None:
    watch = select.poll()  # not select.select: a forked process inherits its parent's descriptors, maybe > 1023
    watch.register(pidfd, select.POLLIN)  # readable once the process has exited
    watch.poll()
    os._exit(1)
