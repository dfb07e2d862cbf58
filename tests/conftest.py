from __future__ import annotations

from collections.abc import Iterator

import pytest

from mesh.echo import EchoIdentity, EchoServer
from tests import testbed
from tests.cluster import control_plane  # noqa: F401  (the session's cluster)
from tests.testbed import Harness


@pytest.fixture
def harness() -> Iterator[Harness]:
    h = Harness()
    h.start_server()
    try:
        yield h
    finally:
        h.close()


@pytest.fixture
def echo_v1() -> Iterator[EchoServer]:
    server = EchoServer("127.0.0.1", 0, EchoIdentity(pod="echo-v1", namespace="test")).start()
    yield server
    server.stop()


@pytest.fixture
def echo_v2() -> Iterator[EchoServer]:
    server = EchoServer("127.0.0.1", 0, EchoIdentity(pod="echo-v2", namespace="test")).start()
    yield server
    server.stop()


@pytest.fixture
def free_port() -> int:
    return testbed.free_port()
