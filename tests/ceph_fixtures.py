"""Fixtures for tests on RBD disks: a real Ceph cluster (tools/ceph.py).

Import them where used (``from tests.ceph_fixtures import ceph_cluster,
ceph_image``). One cluster per test module: it starts in about 1.5 s, and
stopping it at the module's end, failed tests or not, removes everything it
made. Each test's images are removed after the test, so tests in a module do
not see each other's.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator

import pytest

from tools.ceph import Cluster

_names = itertools.count()


@pytest.fixture(scope="module")
def ceph_cluster() -> Iterator[Cluster]:
    cluster = Cluster()
    try:
        yield cluster.start()
    finally:
        cluster.stop()


@pytest.fixture
def ceph_image(ceph_cluster: Cluster) -> Iterator[Callable[[int], str]]:
    """A factory: ``ceph_image(size)`` creates an image in pool rbd, returns its name."""
    made: list[str] = []

    def make(size: int) -> str:
        name = f"img{next(_names)}"
        ceph_cluster.create_image(name, size)
        made.append(name)
        return name

    yield make
    for name in made:
        ceph_cluster.remove_image(name)
