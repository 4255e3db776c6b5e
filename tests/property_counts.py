"""How many cases each property test generated: counted here, reported and checked by tests/conftest.py.

A property module declares `CASE_FLOOR`, the fewest cases its tests must generate together when the
whole module runs; hypothesis can quietly generate fewer than max_examples (filtered draws, a search
space it thinks exhausted), and the count is what the floor is checked against.
"""

from __future__ import annotations

import functools
import os
from collections import Counter

COUNTS: Counter[str] = Counter()  # pytest node id -> cases run


def current_node_id() -> str:
    """The running test's node id, e.g. tests/test_x.py::test_y[param] (pytest sets the variable)."""
    return os.environ["PYTEST_CURRENT_TEST"].rsplit(" ", 1)[0]


def counted(test):
    """Put under @given: every generated case the test body receives adds one to its test's count."""

    @functools.wraps(test)
    def body(*args, **kwargs):
        COUNTS[current_node_id()] += 1
        return test(*args, **kwargs)

    return body
