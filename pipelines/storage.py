"""fsspec storage options with production defaults for object stores.

S3 requests retry with backoff on throttling (SlowDown/503), other 5xx and timeouts: botocore's
``adaptive`` retry mode (exponential backoff with jitter plus client-side rate limiting) with a
generous attempt budget, and explicit connect/read timeouts so a stalled connection is retried
instead of hanging a worker. User-given values always win.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

S3_CONFIG_DEFAULTS: dict[str, Any] = {
    "retries": {"max_attempts": 10, "mode": "adaptive"},
    "connect_timeout": 10,
    "read_timeout": 60,
}


def _merge(defaults: Mapping[str, Any], given: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(dict(defaults))
    for k, v in given.items():
        out[k] = _merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) else v
    return out


def _is_s3(uri: str) -> bool:
    return uri.startswith(("s3://", "s3a://"))


def with_defaults(uris: str | Sequence[str], options: Mapping[str, Any] | None) -> dict[str, Any]:
    """``options`` plus retry/timeout defaults for the protocols ``uris`` use."""
    options = dict(options or {})
    targets = [uris] if isinstance(uris, str) else list(uris)
    if any(_is_s3(u) for u in targets):
        options["config_kwargs"] = _merge(S3_CONFIG_DEFAULTS, options.get("config_kwargs") or {})
    return options
