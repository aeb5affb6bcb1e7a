"""Deprecated alias of :mod:`pipelines.synth` (renamed: ``samples`` clashed with ``Window.samples``).

Kept only while in-flight work still imports ``pipelines.samples``; to be removed.
"""

from pipelines import synth as _synth


def __getattr__(name: str):
    return getattr(_synth, name)
