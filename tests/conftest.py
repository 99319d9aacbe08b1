"""The test suite's fixtures, one module per concern under ``tests/support/`` (nothing imports a conftest).

In CI (``CI=true``) a test whose real peer is missing fails instead of skipping (``tests/support/peers.py``).
"""

pytest_plugins = [
    "tests.support.databases",
    "tests.support.queue_db",
    "tests.support.storescp",
    "tests.support.receivers",
    "tests.support.pki",
    "tests.support.e2e",
    "tests.support.http",
]
