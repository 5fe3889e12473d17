"""How fast the warp is: ``python -m bench`` (BENCH.md).

Every implementation is checked against ``warp_naive`` in float64 before it is
timed; figures are medians next to their baselines and the device copy
bandwidth measured in the same run.
"""
