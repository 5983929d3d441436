import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread: on a loaded 2-core machine two threads make small ops 100x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
