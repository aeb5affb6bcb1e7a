"""Stages of the salmonn-pipeline and the Ray Data graph that joins them.

Every stage module is usable without Ray; only ``pipelines.run`` imports it.
"""

__version__ = "0.1.0"
