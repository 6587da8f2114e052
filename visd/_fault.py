"""Test-only fault injection: a process that SIGKILLs itself at a named point.

Set ``VISD_TRAIN_FAULT=<point>:<step>`` to kill the training process (a real ``SIGKILL``, no
cleanup) when it reaches ``point`` at optimizer step ``step``. Points:

* ``after_step``: right after step ``step`` has been logged;
* ``checkpoint_write``: while the checkpoint of step ``step`` is half written (temporary file only).

Set ``VISD_DIAGNOSE_FAULT=<rank>:<n>`` to kill rank ``<rank>`` (``RANK``, 0 alone) of ``visd diagnose``
right after its ``n``-th scan is journaled (:mod:`visd.zero_shot.journal`).

Unset in normal use; the tests of crash safety and resume use them.
"""

from __future__ import annotations

import os
import signal

ENV = "VISD_TRAIN_FAULT"
DIAGNOSE_ENV = "VISD_DIAGNOSE_FAULT"


def armed(point: str, step: int, env: str = ENV) -> bool:
    """True when the environment variable ``env`` asks to kill the process at ``point`` of ``step``."""
    return os.environ.get(env, "") == f"{point}:{step}"


def kill_if_armed(point: str, step: int, env: str = ENV) -> None:
    if armed(point, step, env):
        os.kill(os.getpid(), signal.SIGKILL)
