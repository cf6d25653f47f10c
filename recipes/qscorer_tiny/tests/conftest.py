import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread_and_fresh_accelerate_state():
    """The tiny models gain nothing from a second thread on shared, busy cores; accelerate keeps
    process-wide state (e.g. the mixed precision) that each training run sets anew."""
    from accelerate.state import AcceleratorState

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    torch.set_num_threads(threads)
