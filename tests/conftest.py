"""Shared pytest setup for the whole suite.

Unit tests need nothing here. Integration tests (tests/integration, marked `integration`) start real programs;
`scripts/test` installs them on a fresh Debian machine. A missing program fails the test with that hint rather
than skipping it, so a green run means everything really ran.
"""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Everything under tests/integration is an integration test, marked or not.
    for item in items:
        if "tests/integration/" in str(item.path).replace("\\", "/"):
            item.add_marker(pytest.mark.integration)
