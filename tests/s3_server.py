"""A local S3 endpoint for tests: moto's ThreadedMotoServer on 127.0.0.1, a free port.

Usable on its own (``with MotoS3() as s3: ...``) or through the fixtures in ``conftest.py``.
Clients reach it with fake credentials: s3fs through :attr:`MotoS3.storage_options`, pyarrow
through :meth:`MotoS3.pyarrow_fs`, boto3 through :meth:`MotoS3.boto3_client`.
"""

from __future__ import annotations

import logging
import os
import urllib.request

FAKE_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_SECURITY_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


class MotoS3:
    """Start/stop/reset a moto S3 server bound to loopback on an OS-chosen port."""

    def __init__(self):
        self._server = None
        self.endpoint_url: str | None = None

    def start(self) -> MotoS3:
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._server.start()
        host, port = self._server.get_host_and_port()
        self.endpoint_url = f"http://{host}:{port}"
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

    def reset(self) -> None:
        """Drop every bucket and object (moto's own reset API)."""
        request = urllib.request.Request(f"{self.endpoint_url}/moto-api/reset", method="POST")
        with urllib.request.urlopen(request, timeout=10) as response:
            response.read()
        try:  # s3fs caches filesystem instances and their listings
            import s3fs

            s3fs.S3FileSystem.clear_instance_cache()
        except ImportError:
            pass

    def put_objects(self, bucket: str, objects: dict[str, bytes]) -> None:
        """Create ``bucket`` if needed and store ``objects`` ({key: bytes}) straight into the
        in-process moto backend: thousands of objects in milliseconds instead of one HTTP PUT
        each. White-box (moto's ``s3_backends``), for tests that need many keys."""
        from moto.core import DEFAULT_ACCOUNT_ID
        from moto.s3.models import s3_backends

        backend = s3_backends[DEFAULT_ACCOUNT_ID]["aws"]
        if bucket not in backend.buckets:
            backend.create_bucket(bucket, "us-east-1")
        for key, value in objects.items():
            backend.put_object(bucket, key, value)

    @property
    def storage_options(self) -> dict:
        """fsspec/s3fs options: ``fsspec.open("s3://b/k", **storage_options)``."""
        return {
            "client_kwargs": {"endpoint_url": self.endpoint_url},
            "key": FAKE_CREDENTIALS["AWS_ACCESS_KEY_ID"],
            "secret": FAKE_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        }

    def s3fs(self):
        import s3fs

        return s3fs.S3FileSystem(skip_instance_cache=True, **self.storage_options)

    def pyarrow_fs(self):
        from pyarrow import fs

        host_port = self.endpoint_url.removeprefix("http://")
        return fs.S3FileSystem(endpoint_override=host_port, scheme="http", region="us-east-1",
                               access_key=FAKE_CREDENTIALS["AWS_ACCESS_KEY_ID"],
                               secret_key=FAKE_CREDENTIALS["AWS_SECRET_ACCESS_KEY"])

    def boto3_client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint_url, region_name="us-east-1",
                            aws_access_key_id=FAKE_CREDENTIALS["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=FAKE_CREDENTIALS["AWS_SECRET_ACCESS_KEY"])

    def __enter__(self) -> MotoS3:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def set_fake_credentials(environ: dict = os.environ) -> dict:
    """Put fake AWS credentials in ``environ`` (and drop AWS_PROFILE); returns the old values
    so the caller can restore them."""
    saved = {k: environ.get(k) for k in [*FAKE_CREDENTIALS, "AWS_PROFILE"]}
    environ.update(FAKE_CREDENTIALS)
    environ.pop("AWS_PROFILE", None)
    return saved


def restore_environ(saved: dict, environ: dict = os.environ) -> None:
    for k, v in saved.items():
        if v is None:
            environ.pop(k, None)
        else:
            environ[k] = v
