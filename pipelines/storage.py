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


# ---------------------------------------------------------------------------------------------
# fsspec options -> delta-rs (object_store) options
# ---------------------------------------------------------------------------------------------

# fsspec key (s3fs / gcsfs / adlfs spelling, or a botocore client argument) -> delta-rs key.
_S3_KEYS = {
    "endpoint_url": "AWS_ENDPOINT_URL",
    "key": "AWS_ACCESS_KEY_ID",
    "aws_access_key_id": "AWS_ACCESS_KEY_ID",
    "secret": "AWS_SECRET_ACCESS_KEY",
    "aws_secret_access_key": "AWS_SECRET_ACCESS_KEY",
    "token": "AWS_SESSION_TOKEN",
    "aws_session_token": "AWS_SESSION_TOKEN",
    "region_name": "AWS_REGION",
    "region": "AWS_REGION",
    "profile": "AWS_PROFILE",
}
_AZURE_KEYS = {
    "account_name": "AZURE_STORAGE_ACCOUNT_NAME",
    "account_key": "AZURE_STORAGE_ACCOUNT_KEY",
    "sas_token": "AZURE_STORAGE_SAS_TOKEN",
    "client_id": "AZURE_STORAGE_CLIENT_ID",
    "client_secret": "AZURE_STORAGE_CLIENT_SECRET",
    "tenant_id": "AZURE_STORAGE_TENANT_ID",
    "connection_string": "AZURE_STORAGE_CONNECTION_STRING",
}


def _flag(value: Any) -> str:
    if isinstance(value, str):
        return "true" if value.strip().lower() in ("1", "true", "yes", "on") else "false"
    return "true" if value else "false"


def _seconds(value: Any) -> str:
    return f"{float(value):g}s"


def delta_options(uri: str, options: Mapping[str, Any] | None) -> dict[str, str]:
    """The delta-rs ``storage_options`` that reach what fsspec ``options`` reach, for ``uri``.

    Users pass fsspec-style options (``endpoint_url``, ``key``, ``secret``, ``token``, ``anon``,
    ``client_kwargs.endpoint_url``, ``client_kwargs.region_name``, ``profile``,
    ``config_kwargs`` timeouts and retries); delta-rs (Rust ``object_store``) takes upper-case
    keys. Options that are already delta-rs keys (upper-case) pass through unchanged. Anything
    not given is left to delta-rs's own defaults, which read the same environment variables
    (``AWS_ACCESS_KEY_ID``, ``AWS_PROFILE``, ``GOOGLE_APPLICATION_CREDENTIALS``, ...) and
    instance credentials as boto and the Google/Azure SDKs. Local paths need none.
    """
    opts = dict(options or {})
    client = dict(opts.pop("client_kwargs", None) or {})
    config = dict(opts.pop("config_kwargs", None) or {})
    out: dict[str, str] = {k: str(v) for k, v in opts.items() if k.isupper()}
    scheme = uri.split("://", 1)[0].lower() if "://" in uri else "file"
    if scheme in ("s3", "s3a"):
        merged = {**config, **client, **opts}  # explicit top-level keys win over client arguments
        for src, dst in _S3_KEYS.items():
            if merged.get(src) not in (None, ""):
                out.setdefault(dst, str(merged[src]))
        if _flag(merged.get("anon", False)) == "true":
            out.setdefault("AWS_SKIP_SIGNATURE", "true")
        endpoint = out.get("AWS_ENDPOINT_URL", "")
        if endpoint.startswith("http://") or merged.get("use_ssl") is False:
            out.setdefault("AWS_ALLOW_HTTP", "true")
        if endpoint and "AWS_REGION" not in out and not _env_region():
            out["AWS_REGION"] = "us-east-1"  # custom endpoints (MinIO, moto) ignore it, but it must be set
        retries = (config.get("retries") or {}).get("max_attempts")
        if retries is not None:
            out.setdefault("max_retries", str(int(retries)))
    elif scheme in ("gs", "gcs"):
        token = opts.get("token")
        if token == "anon" or _flag(opts.get("anon", False)) == "true":
            out.setdefault("GOOGLE_SKIP_SIGNATURE", "true")
        elif isinstance(token, str) and token not in ("google_default", "cloud", "cache", "browser"):
            out.setdefault("GOOGLE_SERVICE_ACCOUNT", token)  # a service-account JSON file
        elif isinstance(token, Mapping):
            import json

            out.setdefault("GOOGLE_SERVICE_ACCOUNT_KEY", json.dumps(dict(token)))
    elif scheme in ("az", "abfs", "abfss", "adl", "azure"):
        for src, dst in _AZURE_KEYS.items():
            if opts.get(src):
                out.setdefault(dst, str(opts[src]))
        if _flag(opts.get("anon", False)) == "true":
            out.setdefault("AZURE_SKIP_SIGNATURE", "true")
    if config.get("connect_timeout") is not None and scheme != "file":
        out.setdefault("connect_timeout", _seconds(config["connect_timeout"]))
    if config.get("read_timeout") is not None and scheme != "file":
        out.setdefault("timeout", _seconds(config["read_timeout"]))
    return out


def _env_region() -> bool:
    import os

    return bool(os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION"))
