import pytest
import torch


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def digits():
    import forwardlearn as fl

    return fl.data.load("digits", "train"), fl.data.load("digits", "test")


@pytest.fixture
def one_thread():
    """torch runs on one CPU thread for the test, and the thread count is restored after it."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
