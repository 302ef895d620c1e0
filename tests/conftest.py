import sys
from pathlib import Path

import pytest

# test helpers (official_layout, official_runner) import as top-level modules
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models and matrices: one torch thread is much faster (and two fight on a busy 2-core
    machine). Opt in per module with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
