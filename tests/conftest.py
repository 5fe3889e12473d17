import os

# The Triton interpreter must be chosen before triton is first imported: the
# tests run the real kernels on CPU tensors through it.
os.environ.setdefault("TRITON_INTERPRET", "1")

import contextlib  # noqa: E402
import zlib  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import settings  # noqa: E402

from tcae_kernels.ops.launch import INTERPRET, OPS  # noqa: E402

if not INTERPRET and not torch.cuda.is_available():
    # Every "kernels" case would silently test the PyTorch fallback.
    raise RuntimeError(
        "without a GPU the tests run the Triton kernels through the interpreter: TRITON_INTERPRET must be "
        f"unset or 1, got {os.environ['TRITON_INTERPRET']!r}"
    )

# "ci" (the default) is fixed-seed and short; HYPOTHESIS_PROFILE=dev searches longer.
settings.register_profile("ci", max_examples=25, derandomize=True, deadline=None, print_blob=True)
settings.register_profile("dev", max_examples=400, deadline=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(autouse=True)
def seed_from_test_id(request):
    """torch's global generator seeded from the test id (a stable digest, unlike hash()): an input
    a test draws without its own generator is still the same on every run of that test."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module: its tiny convolutions gain nothing from intra-op
    threads, and on a shared CPU OpenMP's spin-waiting makes them many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@contextlib.contextmanager
def fallback_on_cpu():
    """Dispatch every op on CPU to its default kernel, the PyTorch fallback, as without the interpreter."""
    with contextlib.ExitStack() as stack:
        for op in OPS.values():
            stack.enter_context(op.set_kernel_enabled("cpu", False))
        yield


@pytest.fixture(params=["kernels", "fallback"])
def path(request):
    """Run the ops through their Triton kernels (interpreter), or through their PyTorch fallback."""
    if request.param == "kernels":
        yield request.param
    else:
        with fallback_on_cpu():
            yield request.param
