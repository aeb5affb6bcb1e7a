"""How a process of this project ends: stop signals, commits they must not cut, and the teardown.

**Stop signals.** SIGTERM is how Kubernetes evicts a pod and how ``ray job stop`` ends a job (both
follow with SIGKILL after a grace period, 30 s by default); SIGINT is Ctrl-C. While a run is
going (:class:`StopSignals`, entered by ``pipelines.run.run_pipeline``) either signal raises
:class:`Interrupted` in the driver's main thread: the driver stops taking results, commits the
files that are already complete, records the run as ``interrupted`` and the command exits with
128 + the signal's number (143, 130). The same command resumes the run. A signal that arrives
while a commit is being written (:func:`critical`) is held until the commit is done: a commit is
two table commits, and stopping between them would leave work for the next attempt to settle.

**Teardown.** :func:`finish` is the last thing every entry point does before the interpreter
finalises (``salmonn-pipeline``, ``python -m jobs.index_archive``, each benchmark): it flushes
standard output and error and collects garbage while the native libraries are still whole, so
Delta tables and Arrow datasets held in reference cycles are released by this thread, not during
finalisation. The abort this guards against ("terminate called without an active exception",
exit 134 after the work was done) had one cause, found with ``gdb``: an Arrow I/O thread
releasing a Python-owned buffer after finalisation began (``pipelines.output.tables.scan``
explains it and reads Delta tables so that no such read outlives its scan).

No Ray here; ``signal`` handlers are process-wide, so there is one active :class:`StopSignals`.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import signal
import sys
import threading
from collections.abc import Iterator
from types import FrameType, TracebackType

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(BaseException):
    """A stop signal arrived during a run. A ``BaseException`` (like ``KeyboardInterrupt``), so the
    handlers of ordinary errors (``except Exception``) let it through."""

    def __init__(self, signum: int):
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        """The shell's convention for a process ended by a signal: 128 + its number."""
        return 128 + self.signum


class StopSignals:
    """Turns SIGTERM and SIGINT into :class:`Interrupted` in the main thread, from ``__enter__``
    to ``__exit__`` (the previous handlers are restored). Only the first signal interrupts: once
    the run is stopping, later ones are logged and ignored, so that the files already complete
    get committed. Outside the main thread (where Python allows no handlers) it does nothing."""

    def __init__(self) -> None:
        self.received: int | None = None     # the first signal's number
        self._critical = 0                   # depth of critical sections (commits)
        self._pending = False                # a signal arrived inside a critical section
        self._previous: dict[int, object] = {}

    # -- installation ------------------------------------------------------------------------
    def __enter__(self) -> StopSignals:
        global _active
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.getsignal(s) for s in STOP_SIGNALS}
            self.install()
            _active = self
        return self

    def install(self) -> None:
        """(Re)install the handlers: ``ray.init`` sets a SIGTERM handler of its own (``sys.exit``),
        so a driver calls this again once Ray is up."""
        if self._previous:
            for s in STOP_SIGNALS:
                signal.signal(s, self._handle)

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        global _active
        if self._previous:
            for s, handler in self._previous.items():
                signal.signal(s, handler)   # type: ignore[arg-type]
            self._previous = {}
        if _active is self:
            _active = None

    # -- the handler -------------------------------------------------------------------------
    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.received is not None:
            log.warning("%s received while the run is already stopping; finishing the commit of the "
                        "complete files first", name)
            return
        self.received = signum
        if self._critical:
            log.warning("%s received during a commit: stopping once it is written", name)
            self._pending = True
            return
        log.warning("%s received: stopping the run (complete files are committed; the same command "
                    "resumes it)", name)
        raise Interrupted(signum)

    @contextlib.contextmanager
    def critical(self) -> Iterator[None]:
        """A section a stop signal must not cut (a commit): the signal takes effect at its end."""
        self._critical += 1
        try:
            yield
        finally:
            self._critical -= 1
        if not self._critical and self._pending:
            self._pending = False
            assert self.received is not None
            raise Interrupted(self.received)


_active: StopSignals | None = None


@contextlib.contextmanager
def critical() -> Iterator[None]:
    """:meth:`StopSignals.critical` of the active run's handlers (nothing to hold otherwise)."""
    if _active is None:
        yield
        return
    with _active.critical():
        yield


def finish(code: int) -> int:
    """Orderly end of an entry point: flush standard streams and release native objects held in
    reference cycles (Delta tables, Arrow datasets) while the libraries are whole; returns
    ``code`` for ``sys.exit``."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    gc.collect()
    return code


def main(entry: object) -> None:
    """``sys.exit(finish(entry()))`` for scripts (the benchmarks): an entry returning None is 0."""
    assert callable(entry)
    code = entry()
    sys.exit(finish(0 if code is None else int(code)))
