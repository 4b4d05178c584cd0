"""netns tier: measurements that tests record are repeated at the end of the
run, so they are visible without -s."""

from __future__ import annotations

import pytest

_MEASUREMENTS: list[str] = []


@pytest.fixture
def measurement(request):
    """Call with a line of text; it is printed now and in the run summary."""

    def record(text: str) -> None:
        line = f"{request.node.nodeid}: {text}"
        print(line)
        _MEASUREMENTS.append(line)

    return record


def pytest_terminal_summary(terminalreporter):
    if _MEASUREMENTS:
        terminalreporter.section("netns measurements")
        for line in _MEASUREMENTS:
            terminalreporter.write_line(line)
