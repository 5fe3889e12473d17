import os

# The Triton interpreter must be chosen before triton is first imported: the
# tests run the real kernels on CPU tensors through it.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import settings  # noqa: E402

# "ci" (the default) is fixed-seed and short; HYPOTHESIS_PROFILE=dev searches longer.
settings.register_profile("ci", max_examples=25, derandomize=True, deadline=None, print_blob=True)
settings.register_profile("dev", max_examples=400, deadline=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module: its tiny convolutions gain nothing from intra-op
    threads, and on a shared CPU OpenMP's spin-waiting makes them many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
