"""torch.ops.qlora.ggml_dequantize / ggml_matmul (bases kept in their GGUF blocks) against
what a Python user has without us: gguf-py's numpy dequantisation (gguf.quants.dequantize,
what transformers runs when it loads a GGUF) followed by torch's linear, in the same process,
at each CPU capability level this machine has. Also NF4 matmul_4bit on the same shape, the
cost of a re-quantised base, for comparison.

    .venv/bin/python benchmarks/bench_ggml.py [--repeat 7] [--shape 4096x4096] [--rows 1,32,256]

Prints medians in ms and the speed-up over gguf-py + torch. Record figures in RESULTS.md with
the CPU they came from (printed first).
"""
import argparse
import os
import pathlib
import statistics
import sys
import time

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as Q

ROOT = pathlib.Path(__file__).resolve().parents[1]
torch.ops.load_library(os.environ.get("QLORA_LIBRARY", str(ROOT / "build/csrc/libqlora_ops.so")))
qlora = torch.ops.qlora
LEVELS = ["portable", "avx2", "avx512", "avx512_bf16"]
TYPES = [Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q8_0, Q.Q4_K, Q.Q5_K, Q.Q6_K]


def cpu_name():
    model, flags = "?", []
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name") and model == "?":
            model = line.split(":", 1)[1].strip()
        if line.startswith("flags") and not flags:
            have = set(line.split(":", 1)[1].split())
            flags = [f for f in ["avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_bf16",
                                 "amx_tile"] if f in have]
    return f"{model}, flags: {' '.join(flags)}"


def median_ms(fn, repeat):
    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def random_blocks(qtype, rows, cols, rng):
    """Blocks of a quantised normal weight where gguf-py can quantise, random bytes with small
    f16 scales otherwise (the speed does not depend on the values)."""
    try:
        w = (rng.standard_normal((rows, cols)) * 0.02).astype(np.float32)
        return np.ascontiguousarray(gguf.quants.quantize(w, qtype)).view(np.uint8).reshape(rows, -1)
    except NotImplementedError:
        bs, ts = gguf.GGML_QUANT_SIZES[qtype]
        n = rows * cols // bs
        blocks = rng.integers(0, 256, (n, ts), dtype=np.uint8)
        scale_at = [208] if qtype == Q.Q6_K else [0, 2]
        for at in scale_at:
            blocks[:, at:at + 2] = rng.integers(0, 0x2000, n).astype(np.uint16).view(np.uint8).reshape(-1, 2)
        return blocks.reshape(rows, -1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--shape", default="4096x4096")
    ap.add_argument("--rows", default="1,32,256")
    ap.add_argument("--levels", default="")
    args = ap.parse_args()
    rows_list = [int(r) for r in args.rows.split(",")]
    N, K = (int(v) for v in args.shape.split("x"))
    torch.set_num_threads(2)
    top = qlora.cpu_capability()
    levels = args.levels.split(",") if args.levels else LEVELS[:LEVELS.index(top) + 1]
    print(f"CPU: {cpu_name()}")
    print(f"torch {torch.__version__}, gguf-py {gguf.__version__ if hasattr(gguf, '__version__') else '0.19.0'}, "
          f"{torch.get_num_threads()} threads, median of {args.repeat}, shape {N}x{K} float32")
    rng = np.random.default_rng(0)
    w_nf4 = torch.randn(N, K) * 0.02
    packed, absmax = qlora.quantize_4bit(w_nf4, 64, "nf4", torch.uint8)
    header = f"{'level':<12}{'type':<6}{'op':<14}{'gguf-py+torch ms':>18}{'ours ms':>10}{'speed-up':>10}"
    print(header)
    for level in levels:
        qlora.cpu_capability(level)
        for qtype in TYPES:
            blocks = random_blocks(qtype, N, K, rng)
            t = torch.from_numpy(blocks)
            ref_w = lambda: torch.from_numpy(gguf.quants.dequantize(blocks, qtype))  # noqa: E731
            ref = median_ms(ref_w, max(1, args.repeat // 2))
            ours = median_ms(lambda: qlora.ggml_dequantize(t, qtype.name, [N, K], torch.float32), args.repeat)
            print(f"{level:<12}{qtype.name:<6}{'dequantize':<14}{ref:>18.1f}{ours:>10.1f}{ref / ours:>9.1f}x")
            for rows in rows_list:
                x = torch.randn(rows, K)
                ref = median_ms(lambda: torch.nn.functional.linear(x, ref_w()), max(1, args.repeat // 2))
                ours = median_ms(lambda: qlora.ggml_matmul(x, t, qtype.name, [N, K], None), args.repeat)
                print(f"{level:<12}{qtype.name:<6}{f'matmul x{rows}':<14}{ref:>18.1f}{ours:>10.1f}{ref / ours:>9.1f}x")
        for rows in rows_list:
            x = torch.randn(rows, K)
            ours = median_ms(lambda: qlora.matmul_4bit(x, packed, absmax, 64, "nf4", [N, K], None), args.repeat)
            print(f"{level:<12}{'NF4':<6}{f'matmul x{rows}':<14}{'':>18}{ours:>10.1f}")
    qlora.cpu_capability(top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
