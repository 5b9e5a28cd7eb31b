"""Collects every conformance result on the pytest config and prints the operation x mode matrix at the end."""
import pytest

_KEY = pytest.StashKey[list]()


@pytest.fixture
def conformance_results(request) -> list:
    return request.config.stash.setdefault(_KEY, [])


def pytest_terminal_summary(terminalreporter, config):
    results = config.stash.get(_KEY, [])
    if not results:
        return
    from dspark.conformance import matrix

    by_backend = {}
    for result in results:
        by_backend.setdefault(result.backend, []).append(result)
    for rows in by_backend.values():
        terminalreporter.write_line("")
        for line in matrix(rows).splitlines():
            terminalreporter.write_line(line)
