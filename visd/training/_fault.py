"""Test-only fault injection: a process that SIGKILLs itself at a named point.

Set ``VISD_TRAIN_FAULT=<point>:<step>`` to kill the training process (a real ``SIGKILL``, no
cleanup) when it reaches ``point`` at optimizer step ``step``. Points:

* ``after_step``: right after step ``step`` has been logged;
* ``checkpoint_write``: while the checkpoint of step ``step`` is half written (temporary file only).

Unset in normal use; the tests of crash safety and resume use it.
"""

from __future__ import annotations

import os
import signal

ENV = "VISD_TRAIN_FAULT"


def armed(point: str, step: int) -> bool:
    """True when the environment asks to kill the process at ``point`` of ``step``."""
    return os.environ.get(ENV, "") == f"{point}:{step}"


def kill_if_armed(point: str, step: int) -> None:
    if armed(point, step):
        os.kill(os.getpid(), signal.SIGKILL)
