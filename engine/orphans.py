"""No process of ours outlives the process that started it.

Two ways, for two kinds of child:

* `die_with_parent` (a `Popen` ``preexec_fn``, or a worker's first call): the kernel sends
  the child SIGTERM when its parent dies (Linux ``PR_SET_PDEATHSIG``). The signal follows
  the parent *thread* that started the child, so use it where that thread lives as long as
  the process (the launcher's main thread, a tensor-parallel engine's).
* `exit_when_orphaned` (a pool worker's ``initializer``): a daemon thread in the child
  exits it once its parent is gone, whichever thread of the parent started it (a
  `ProcessPoolExecutor` starts workers from whichever thread submits first).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import threading
import time

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """SIGTERM this process when its parent dies (Linux; elsewhere nothing)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def exit_when_orphaned(parent_pid: int, period_s: float = 0.5) -> None:
    """Exit this process (code 1, no cleanup: its parent is gone) once its parent is not
    ``parent_pid`` any more; checked every ``period_s`` by a daemon thread."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(period_s)
        os._exit(1)

    threading.Thread(target=watch, name="exit-when-orphaned", daemon=True).start()
