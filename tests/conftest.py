"""Shared test set-up: the ``multiprocess`` marker.

Tests that start other processes (torchrun ranks, network namespaces, a killed run, parallel
reproductions) carry ``@pytest.mark.multiprocess``; tests that use a module fixture which
launches the ranks once for the whole module (``launched``, ``measured``) get it here. They are
most of the suite's time: ``pytest -m "not multiprocess"`` is the quick loop, the README's test
command (and CI) runs everything.
"""

import pytest

#: module fixtures that start processes for every test that uses them
PROCESS_FIXTURES = {"launched", "measured"}


def pytest_collection_modifyitems(items):
    for item in items:
        if PROCESS_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.multiprocess)
