"""Children that die with the process that started them.

The training child runs in its own session (so a timeout can kill it and its torchrun workers as one
group), which also means nothing stops it when the flow process is SIGKILLed (OOM killer, node drain,
`kill -9` of a worker): the GPU lock is freed by the kernel, but the orphan keeps the GPU's memory and
the next run fails out of memory. A watcher thread in the child ends its whole process group once the
process that started the training is gone.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

PARENT_PID_ENV = "QLORA_FLOW_PARENT_PID"

log = logging.getLogger(__name__)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def exit_with_parent(poll_seconds: float = 1.0) -> threading.Thread | None:
    """Watch the pid named in QLORA_FLOW_PARENT_PID; when it is gone, SIGKILL this process group.

    The pid comes from the environment, not getppid(): torchrun workers' parent is the launcher, and the
    launcher's parent may already be init by the time the watcher starts."""
    parent = int(os.environ.get(PARENT_PID_ENV, "0"))
    if parent <= 0:
        return None

    def watch() -> None:
        while _alive(parent):
            time.sleep(poll_seconds)
        log.warning("the process that started this training (pid %d) is gone; stopping the training", parent)
        os.killpg(os.getpgrp(), signal.SIGKILL)

    thread = threading.Thread(target=watch, name="exit-with-parent", daemon=True)
    thread.start()
    return thread
