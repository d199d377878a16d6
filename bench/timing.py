"""Timing shared by the peer scripts: `warmup` untimed calls, then the mean of `iters` calls."""
import time


def mean_seconds(fn, iters, warmup=1):
    for _ in range(warmup):
        fn()
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t) / iters
