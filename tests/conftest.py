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
