"""SIGKILL a real CLI driver at a chosen moment (the resume tests of test_production and test_long_files)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

CLI = [str(Path(sys.executable).with_name("salmonn-pipeline"))]


def kill_driver_when(cmd: Sequence[str], ready: Callable[[], bool], *, timeout_s: float, what: str,
                     env: Mapping[str, str] | None = None, poll_s: float = 0.5, after_s: float = 0.0) -> None:
    """Start ``cmd`` in a session of its own, wait until ``ready()`` (``what`` names that moment in
    the failure messages), wait ``after_s`` more, then SIGKILL the driver and the process group it
    leads (the local Ray a killed driver started lives there). Fails if the run ends first or
    ``ready()`` is not reached within ``timeout_s``."""
    proc = subprocess.Popen(list(cmd), env=dict(env) if env is not None else None, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + timeout_s
        while not ready():
            assert proc.poll() is None, f"the run ended before {what}"
            assert time.time() < deadline, f"not {what} within {timeout_s:g} s"
            time.sleep(poll_s)
        time.sleep(after_s)
        assert proc.poll() is None, "the run ended before the kill"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
