"""bitsandbytes (pinned, CPU) vs qlora-cpp in one process run: quantize,
dequantize and matmul_4bit on LLaMA-sized weights, fp32 and bf16, with a
memcpy (tensor copy) of the same output bytes as the bandwidth yardstick.

    .venv/bin/python benchmarks/bench_vs_bnb.py [--repeat 5] [--threads N] [--cpu-level avx2]
"""
import argparse
import os
import statistics
import time
import warnings

import torch

import cpu_level

warnings.filterwarnings("ignore")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
torch.ops.load_library(os.environ.get("QLORA_LIBRARY", os.path.join(REPO, "build/csrc/libqlora_ops.so")))

import bitsandbytes as bnb  # noqa: E402
import bitsandbytes.functional as F  # noqa: E402


def timed(fn, repeat):
    fn()  # warm-up (and bitsandbytes' torch.compile, where it uses it)
    samples = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t)
    return statistics.median(samples)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    cpu_level.add_argument(ap)
    args = ap.parse_args()
    cpu_level.apply(args.cpu_level)
    torch.set_num_threads(args.threads)
    print(cpu_level.describe())
    print(f"torch {torch.__version__}, bitsandbytes {bnb.__version__}, {args.threads} threads, "
          f"median of {args.repeat}, qlora kernels at level {torch.ops.qlora.cpu_capability()}")
    print(f"{'op':<12}{'shape':<12}{'dtype':<6}{'bnb ms':>9}{'ours ms':>9}{'speed-up':>9}"
          f"{'ours GB/s':>10}{'memcpy GB/s':>12}{'% memcpy':>9}")
    qlora = torch.ops.qlora
    for rows, cols in [(4096, 4096), (4096, 11008)]:
        for dtype in [torch.float32, torch.bfloat16]:
            w = (torch.randn(rows, cols) * 0.02).to(dtype)
            name = {torch.float32: "fp32", torch.bfloat16: "bf16"}[dtype]
            shape = f"{rows}x{cols}"
            dst = torch.empty_like(w)
            t_copy = timed(lambda: dst.copy_(w), args.repeat)
            copy_gbs = w.nbytes / t_copy / 1e9

            t_bnb = timed(lambda: F.quantize_4bit(w, blocksize=64, quant_type="nf4"), args.repeat)
            t_ours = timed(lambda: qlora.quantize_4bit(w, 64, "nf4", torch.uint8), args.repeat)
            print(f"{'quantize':<12}{shape:<12}{name:<6}{t_bnb*1e3:>9.1f}{t_ours*1e3:>9.1f}{t_bnb/t_ours:>8.1f}x"
                  f"{w.nbytes/t_ours/1e9:>10.2f}{copy_gbs:>12.2f}{'':>9}")

            packed, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4")
            t_bnb = timed(lambda: F.dequantize_4bit(packed, state), args.repeat)
            t_ours = timed(lambda: qlora.dequantize_4bit(packed, state.absmax, 64, "nf4", [rows, cols], dtype),
                           args.repeat)
            gbs = w.nbytes / t_ours / 1e9
            print(f"{'dequantize':<12}{shape:<12}{name:<6}{t_bnb*1e3:>9.1f}{t_ours*1e3:>9.1f}{t_bnb/t_ours:>8.1f}x"
                  f"{gbs:>10.2f}{copy_gbs:>12.2f}{gbs/copy_gbs:>8.0%}")

            out = torch.empty_like(w)
            t_into = timed(lambda: qlora.dequantize_4bit.out(packed, state.absmax, 64, "nf4", [rows, cols], dtype, out),
                           args.repeat)
            gbs = w.nbytes / t_into / 1e9
            print(f"{'deq (.out)':<12}{shape:<12}{name:<6}{'':>9}{t_into*1e3:>9.1f}{'':>9}"
                  f"{gbs:>10.2f}{copy_gbs:>12.2f}{gbs/copy_gbs:>8.0%}")

            with torch.no_grad():
                for n in [1, 32, 256]:
                    x = torch.randn(n, cols).to(dtype)
                    t_bnb = timed(lambda: bnb.matmul_4bit(x, packed.t(), quant_state=state), args.repeat)
                    t_ours = timed(lambda: qlora.matmul_4bit(x, packed, state.absmax, 64, "nf4", [rows, cols]),
                                   args.repeat)
                    print(f"{f'matmul x{n}':<12}{shape:<12}{name:<6}{t_bnb*1e3:>9.1f}{t_ours*1e3:>9.1f}"
                          f"{t_bnb/t_ours:>8.1f}x")


if __name__ == "__main__":
    main()
