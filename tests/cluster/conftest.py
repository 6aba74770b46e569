"""The local cluster, brought up once per test session for every test that asks for it."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.cluster import cluster


@pytest.fixture(scope="session")
def local_cluster() -> Iterator[None]:
    """Factory-new hosts for the session, whatever ran before (`make demo` leaves them tuned and serving, an
    earlier test run may have left them changed): the hosts that are up are replaced. Taken down afterwards.

    Set LLMFLEET_KEEP_CLUSTER=1 to leave them up after the session, for poking at by hand.
    """
    if os.geteuid() != 0:
        pytest.skip("the local cluster needs root")
    cluster.recreate()
    yield
    if not os.environ.get("LLMFLEET_KEEP_CLUSTER"):
        cluster.down()
