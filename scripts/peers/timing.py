"""Timing shared by the peers' benchmarks (torch_bench.py and bench-peers.sh's ONNX Runtime part,
which must run without torch)."""

import statistics
import time


def median_ms(f, reps):
    """Median wall time of `reps` calls of f, in ms, after one untimed warm-up call."""
    f()
    t = []
    for _ in range(reps):
        t0 = time.perf_counter()
        f()
        t.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(t)
