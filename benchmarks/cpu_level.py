"""The CPU a benchmark ran on, and running a benchmark as a CPU of a lower
capability level would: `--cpu-level avx2` re-executes the script with our
kernels capped (QLORA_CPU_CAPABILITY) and LibTorch's own capped too (ATen's
vector kernels, oneDNN, MKL), so both sides of a comparison see that level.
A capped run on a bigger CPU is not a real AVX2-only machine (caches, clocks
and memory stay), and the printed header says which it was."""
import os
import re
import subprocess
import sys

LEVELS = ["portable", "avx2", "avx512", "avx512_bf16"]
TORCH_CAPS = {
    "portable": {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41",
                 "MKL_ENABLE_INSTRUCTIONS": "SSE4_2"},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
    "avx512": {"ATEN_CPU_CAPABILITY": "avx512", "ONEDNN_MAX_CPU_ISA": "AVX512_CORE",
               "MKL_ENABLE_INSTRUCTIONS": "AVX512"},
    "avx512_bf16": {},
}


def add_argument(parser):
    parser.add_argument("--cpu-level", choices=LEVELS,
                        help="run as a CPU of this level (ours and LibTorch's kernels capped)")


def level_env(level):
    env = {"QLORA_CPU_CAPABILITY": level}
    env.update(TORCH_CAPS[level])
    return env


def apply(level):
    """Re-executes this process with the level's variables, once."""
    if not level or os.environ.get("QLORA_CPU_CAPABILITY") == level:
        return
    env = dict(os.environ, **level_env(level))
    os.execve(sys.executable, [sys.executable] + sys.argv, env)


def describe():
    """`lscpu` model name and the SIMD flags that decide our levels."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=30).stdout
    except OSError:
        return "CPU: lscpu not available"
    model = re.search(r"Model name:\s*(.+)", out)
    flags = re.search(r"Flags:\s*(.+)", out)
    shown = [f for f in (flags.group(1).split() if flags else [])
             if f in ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16",
                      "avx512_fp16", "amx_tile", "amx_bf16", "avx_vnni")]
    cap = os.environ.get("QLORA_CPU_CAPABILITY")
    capped = f"; capped to {cap} ({', '.join(f'{k}={v}' for k, v in level_env(cap).items())})" if cap else ""
    return f"CPU: {model.group(1).strip() if model else '?'}, flags: {' '.join(shown)}{capped}"
