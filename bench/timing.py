"""Timing shared by the peer scripts: one untimed warm-up call, then the mean of `iters` calls."""
import time


def mean_seconds(fn, iters):
    fn()
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t) / iters
