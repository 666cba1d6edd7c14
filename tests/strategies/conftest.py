import pytest


@pytest.fixture(autouse=True)
def flower_task_identity(monkeypatch):
    """Messages read the run/node identity Flower sets in an app process; set one for tests."""
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
