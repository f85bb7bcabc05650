"""Fused optimizer updates against the unfused op chain and bitsandbytes' CPU kernels,
in one process: one Adam(W) step of an N-element parameter, 32-bit and 8-bit blockwise
states. The unfused chain is what PagedAdamW ran before the fused ops (dequantise the
8-bit states, a chain of elementwise ops, quantise again) and still runs with
fused(false).

    .venv/bin/python benchmarks/bench_optimizer.py [--n 16777216] [--reps 5]
"""
import argparse
import math
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "python"))
import conftest  # noqa: E402,F401  (loads libqlora_ops)
import bitsandbytes  # noqa: E402,F401
from bitsandbytes.functional import create_dynamic_map  # noqa: E402

qlora = torch.ops.qlora
LR, B1, B2, EPS, WD = 1e-3, 0.9, 0.999, 1e-8, 0.01


def unfused_32(g, p, m, v, step):
    f = lambda x: float(torch.tensor(x, dtype=torch.float32))  # noqa: E731
    p.mul_(f(1 - LR * WD))
    m.mul_(f(B1)).add_(g.mul(f(1 - B1)))
    v.mul_(f(B2)).add_(g.mul(g).mul_(f(1 - B2)))
    denom = v.double().sqrt_().float().div_(f(math.sqrt(1 - B2 ** step))).add_(f(EPS))
    p.add_(m.div(denom).mul_(f(-LR / (1 - B1 ** step))))


def unfused_8(g, p, q1, q2, a1, a2, map1, map2, step):
    m = qlora.dequantize_blockwise(q1, a1, map1, 256, torch.float32)
    v = qlora.dequantize_blockwise(q2, a2, map2, 256, torch.float32)
    unfused_32(g, p, m, v, step)
    n1, b1 = qlora.quantize_blockwise(m, map1, 256)
    n2, b2 = qlora.quantize_blockwise(v, map2, 256)
    q1.copy_(n1), a1.copy_(b1), q2.copy_(n2), a2.copy_(b2)


def timed(fn, reps):
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1 << 24)
    ap.add_argument("--reps", type=int, default=5)
    a = ap.parse_args()
    n = a.n
    torch.manual_seed(0)
    g = torch.randn(n) * 0.01
    map1, map2 = create_dynamic_map(True), create_dynamic_map(False)
    blocks = -(-n // 256)

    def fresh32():
        return torch.randn(n), torch.zeros(n), torch.zeros(n)

    def fresh8():
        return (torch.randn(n), torch.full((n,), 127, dtype=torch.uint8),
                torch.zeros(n, dtype=torch.uint8), torch.zeros(blocks), torch.zeros(blocks))

    rows = []
    p, m, v = fresh32()
    rows.append(("32-bit fused (qlora)", timed(lambda: qlora.optimizer_update_32bit(
        "adam", g, p, m, v, None, 0.0, 0.0, B1, B2, 0.0, 0.0, EPS, WD, 2, LR, 1.0), a.reps)))
    p, m, v = fresh32()
    rows.append(("32-bit unfused op chain", timed(lambda: unfused_32(g, p, m, v, 2), a.reps)))
    p, m, v = fresh32()
    rows.append(("32-bit bitsandbytes CPU", timed(lambda: torch.ops.bitsandbytes.optimizer_update_32bit(
        "adam", g, p, m, v, None, 0.0, 0.0, B1, B2, 0.0, 0.0, EPS, WD, 2, LR, 1.0), a.reps)))
    p, q1, q2, a1, a2 = fresh8()
    rows.append(("8-bit fused (qlora)", timed(lambda: qlora.optimizer_update_8bit_blockwise(
        "adam", g, p, q1, q2, B1, B2, 0.0, 0.0, EPS, 2, LR, map1, map2, a1, a2, WD, 1.0), a.reps)))
    p, q1, q2, a1, a2 = fresh8()
    rows.append(("8-bit unfused op chain", timed(lambda: unfused_8(g, p, q1, q2, a1, a2, map1, map2, 2),
                                                 a.reps)))
    p, q1, q2, a1, a2 = fresh8()
    rows.append(("8-bit bitsandbytes CPU", timed(lambda: torch.ops.bitsandbytes.optimizer_update_8bit_blockwise(
        "adam", g, p, q1, q2, B1, B2, 0.0, 0.0, EPS, 2, LR, map1, map2, a1, a2, WD, 1.0), a.reps)))
    print(f"one Adam(W) step of {n} parameters, {torch.get_num_threads()} threads, median of {a.reps}")
    base = {k.split()[0]: t for k, t in rows if "fused (qlora)" in k}
    for name, t in rows:
        ref = base[name.split()[0]]
        print(f"  {name:28s} {t * 1e3:8.1f} ms  {n / t / 1e6:7.1f} M params/s  {t / ref:5.2f}x ours")


if __name__ == "__main__":
    main()
