"""One module per op (kernels, launchers, custom op), after Liger-Kernel's ``ops/``.

``sampling`` holds the ``@triton.jit`` helpers every kernel shares and
``launch`` the host side they share: dispatch, launch sizing, the src-gradient
accumulator and op registration.
"""
