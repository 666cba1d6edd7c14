import pytest


@pytest.fixture(autouse=True)
def _identity(flower_task_identity):
    """Every strategy test makes Flower messages (tests/conftest.py sets the identity)."""
