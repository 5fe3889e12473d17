import os

# The Triton interpreter must be chosen before triton is first imported: the
# tests run the real kernels on CPU tensors through it.
os.environ.setdefault("TRITON_INTERPRET", "1")

from hypothesis import settings  # noqa: E402

# "ci" (the default) is fixed-seed and short; HYPOTHESIS_PROFILE=dev searches longer.
settings.register_profile("ci", max_examples=25, derandomize=True, deadline=None, print_blob=True)
settings.register_profile("dev", max_examples=400, deadline=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
