"""The old name of :mod:`pipelines.output` (``from pipelines.commit import OutputStore``), kept so
that users' scripts keep working; new code imports from ``pipelines.output``.

The output code was one module here; it is now the package :mod:`pipelines.output` (store,
tables, ledger, commit, maintenance, migrate).
"""

from pipelines.output import OutputStore, migrate

__all__ = ["OutputStore", "migrate"]
