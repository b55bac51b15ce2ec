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


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny random BERT with a 25-word tokenizer saved as a Hugging Face model directory (tests/hf_fixtures.py)."""
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    from hf_fixtures import tiny_bert_dir

    return tiny_bert_dir(tmp_path_factory.mktemp("tinybert"))
