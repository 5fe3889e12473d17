import os

# The Triton interpreter must be chosen before triton is first imported: the
# tests run the real kernels on CPU tensors through it.
os.environ.setdefault("TRITON_INTERPRET", "1")
