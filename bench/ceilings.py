#!/usr/bin/env python3
"""The machine's own ceilings, measured with numpy on 2 threads: f32 matrix-multiply GFLOP/s
(at the shapes of a batched decode step of SmolLM2-135M) and memory bandwidth (large copies and
reads). Prints JSON."""

import json
import time

import numpy as np


def best(f, repeat=7):
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    return min(times)


def main():
    out = {}
    rng = np.random.default_rng(0)
    for m in (1, 32, 256):
        a = rng.standard_normal((m, 576), dtype=np.float32)
        b = rng.standard_normal((576, 1536), dtype=np.float32)
        t = best(lambda: a @ b, repeat=50 if m == 1 else 15)
        out[f"matmul_gflops_m{m}"] = 2 * m * 576 * 1536 / t / 1e9
    big = rng.standard_normal(64 * 1024 * 1024 // 4 * 4, dtype=np.float32)  # 256 MiB
    dst = np.empty_like(big)
    t = best(lambda: np.copyto(dst, big), repeat=5)
    out["copy_gbs"] = 2 * big.nbytes / t / 1e9  # read + write
    t = best(lambda: big.sum(), repeat=5)
    out["read_gbs"] = big.nbytes / t / 1e9
    print(json.dumps(out))


if __name__ == "__main__":
    main()
