"""Signal a real CLI driver at a chosen moment (the resume tests of test_production and
test_long_files): SIGKILL (a crash) or SIGTERM (a pod eviction, ``ray job stop``)."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

CLI = [str(Path(sys.executable).with_name("salmonn-pipeline"))]


@dataclasses.dataclass(frozen=True)
class Ended:
    returncode: int
    exit_s: float     # from the signal to the driver's exit
    stderr: str


def signal_driver_when(cmd: Sequence[str], ready: Callable[[], bool], *, timeout_s: float, what: str,
                       sig: int = signal.SIGKILL, grace_s: float = 30.0, env: Mapping[str, str] | None = None,
                       poll_s: float = 0.5, after_s: float = 0.0) -> Ended:
    """Start ``cmd`` in a session of its own, wait until ``ready()`` (``what`` names that moment in
    the failure messages), wait ``after_s`` more, then send ``sig`` to the driver and wait up to
    ``grace_s`` for it to exit (as Kubernetes does before its SIGKILL); finally SIGKILL the process
    group it leads (the local Ray a killed driver started lives there). Fails if the run ends first
    or ``ready()`` is not reached within ``timeout_s``. Returns how the driver ended."""
    err_file = tempfile.TemporaryFile(mode="w+")   # a pipe could fill up and block the driver
    proc = subprocess.Popen(list(cmd), env=dict(env) if env is not None else None, stdout=subprocess.DEVNULL,
                            stderr=err_file, start_new_session=True)
    try:
        deadline = time.time() + timeout_s
        while not ready():
            assert proc.poll() is None, f"the run ended before {what}"
            assert time.time() < deadline, f"not {what} within {timeout_s:g} s"
            time.sleep(poll_s)
        time.sleep(after_s)
        assert proc.poll() is None, "the run ended before the signal"
        t0 = time.monotonic()
        os.kill(proc.pid, sig)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        exit_s = time.monotonic() - t0
        err_file.seek(0)
        return Ended(proc.returncode, exit_s, err_file.read())
    finally:
        err_file.close()
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def kill_driver_when(cmd: Sequence[str], ready: Callable[[], bool], *, timeout_s: float, what: str,
                     env: Mapping[str, str] | None = None, poll_s: float = 0.5, after_s: float = 0.0) -> None:
    """:func:`signal_driver_when` with SIGKILL: the driver dies where it is."""
    signal_driver_when(cmd, ready, timeout_s=timeout_s, what=what, env=env, poll_s=poll_s, after_s=after_s)
