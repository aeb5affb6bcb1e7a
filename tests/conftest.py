"""Shared fixtures: a local S3 endpoint (moto) and fsspec options to reach it, one local Ray; the
tiny model's fixtures (tiny_model, tiny_parts, clips, embeds, single_embeds) come from
tests/model_fixtures.py as a plugin, so no test imports a fixture by name."""

from __future__ import annotations

import pytest

from tests.s3_server import MotoS3, restore_environ, set_fake_credentials

pytest_plugins = ["tests.model_fixtures"]


@pytest.fixture(scope="session", autouse=True)
def _search_cache(tmp_path_factory):
    """Local copies of search indexes of object-storage outputs (pipelines.search) go to a folder
    of the session, never to the user's ~/.cache; subprocesses inherit it."""
    import os

    from pipelines.search.sync import CACHE_ENV

    saved = os.environ.get(CACHE_ENV)
    os.environ[CACHE_ENV] = str(tmp_path_factory.mktemp("search-cache"))
    yield
    if saved is None:
        os.environ.pop(CACHE_ENV, None)
    else:
        os.environ[CACHE_ENV] = saved


@pytest.fixture(scope="session")
def _moto_server():
    saved = set_fake_credentials()
    server = MotoS3().start()
    try:
        yield server
    finally:
        server.stop()
        restore_environ(saved)


@pytest.fixture
def s3_server(_moto_server) -> MotoS3:
    """The session's moto S3 server, emptied before each test."""
    _moto_server.reset()
    return _moto_server


@pytest.fixture
def s3_storage_options(s3_server) -> dict:
    """s3fs options for the test server: ``{"client_kwargs": {"endpoint_url": ...}, "key",
    "secret"}``."""
    return s3_server.storage_options


@pytest.fixture
def s3fs_client(s3_server):
    """An s3fs filesystem on the test server (not shared with the code under test)."""
    return s3_server.s3fs()


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray (2 CPUs, as in CI) shared by the tests that run the pipeline in-process."""
    import logging

    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.WARNING,
             log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()
