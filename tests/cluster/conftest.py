"""The local cluster, brought up once per test session for every test that asks for it."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.cluster import cluster


@pytest.fixture(scope="session")
def local_cluster() -> Iterator[None]:
    """Bring the five hosts up (a no-op when they already are); take them down after the session.

    Set LLMFLEET_KEEP_CLUSTER=1 to leave them up for the next run or for poking at by hand.
    """
    if os.geteuid() != 0:
        pytest.skip("the local cluster needs root")
    cluster.up()
    yield
    if not os.environ.get("LLMFLEET_KEEP_CLUSTER"):
        cluster.down()
