"""Helpers shared by the bit-exact conformance tests against ggml (test_kquant_encoders.py,
test_gguf_quant_mix.py):

* building a small torch-free C++ harness from tests/tools with g++ (libqlora's flags),
* running llama.cpp code in a separate interpreter that never imports torch (llama.cpp has died
  with SIGILL in a process that had libtorch loaded), in particular
* ggml's reference quantizers (ggml_quantize_chunk without an importance matrix, the ones
  llama-quantize runs) from llama-cpp-python's libggml-base, called through ctypes,
* generators of the float32 block cases both tests feed to ggml and to our encoders,
  parametrised by the block size (256 for the K-quants, 32 for the legacy types).

Not a test module: pytest only collects test_*.py. It imports neither torch nor llama_cpp.
"""
import importlib.util
import json
import pathlib
import shutil
import subprocess
import sys

import gguf
import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
TOOLS = REPO / "tests" / "tools"
CSRC = REPO / "csrc"

# ---- the harnesses -----------------------------------------------------------------------------


def build_harness(tmp_path_factory, name, sources, opt=("-O2",)):
    """Compiles tests/tools/<name>.cpp with the csrc/ files `sources` into a fresh temp dir;
    returns the executable. Built as libqlora is by default (-O2), or with the optimisation
    flags `opt`: bit-exactness needs every float operation rounded on its own, so contraction
    is always off."""
    gxx = shutil.which("g++")
    if gxx is None:
        pytest.skip("g++ not found")
    exe = tmp_path_factory.mktemp(name) / name
    cmd = [gxx, "-std=c++17", *opt, "-ffp-contract=off", "-Wall", "-Wextra", "-Werror",
           "-I", str(CSRC), str(TOOLS / f"{name}.cpp"), *(str(CSRC / s) for s in sources),
           "-o", str(exe)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, f"{' '.join(cmd)}\n{p.stderr}"
    return exe


# ---- llama.cpp in a torch-free interpreter ---------------------------------------------------

def needs_llama_cpp():
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("llama-cpp-python is not installed")


def libggml_base():
    """Path of llama-cpp-python's libggml-base (libggml in wheels without the split), which
    holds the reference quantizers; skips when llama-cpp-python is not installed. Found without
    importing llama_cpp."""
    needs_llama_cpp()
    libdir = pathlib.Path(importlib.util.find_spec("llama_cpp").origin).parent / "lib"
    paths = sorted(libdir.glob("libggml-base.so*")) or sorted(libdir.glob("libggml.so*"))
    assert paths, f"no libggml-base.so or libggml.so in {libdir}"
    return paths[0]


# Put before every script: `import torch` fails in the oracle's interpreter, so nothing it
# loads can bring libtorch in.
NO_TORCH = 'import sys\nsys.modules["torch"] = None\n'


def run_isolated(script, *args, what="ggml oracle failed", timeout=600):
    """Runs the Python source `script` with argv[1:] = args in a fresh interpreter that cannot
    import torch; returns the CompletedProcess after checking that it exited 0."""
    p = subprocess.run([sys.executable, "-c", NO_TORCH + script, *map(str, args)],
                       capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"{what} (exit {p.returncode}):\n{p.stderr[-3000:]}"
    return p


# Loads only libggml-base (argv[1]) and saves ggml's results for every array of the input .npz
# (argv[2]) to argv[3]: arrays "chunk/NAME" (rows, n_per_row) quantized by ggml_quantize_chunk
# to every type of the JSON argv[4], {type: [ggml code, block elements, block bytes]}, under
# "type/NAME"; arrays "f16/NAME" converted by ggml_fp32_to_fp16_row, under "f16/NAME".
QUANTIZE = r"""
import ctypes, json, sys
import numpy as np
lib = ctypes.CDLL(sys.argv[1])
chunk = lib.ggml_quantize_chunk
chunk.restype = ctypes.c_size_t
chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                  ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
to_half = lib.ggml_fp32_to_fp16_row
to_half.restype = None
to_half.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
inp, out, types = sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
res = {}
with np.load(inp) as f:
    for key in f.files:
        op, name = key.split("/", 1)
        x = np.ascontiguousarray(f[key], dtype=np.float32)
        if op == "f16":
            h = np.zeros(x.size, np.uint16)
            to_half(x.ctypes.data, h.ctypes.data, x.size)
            res[key] = h
            continue
        assert op == "chunk", key
        rows, n_per_row = x.shape
        for t, (code, block, size) in types.items():
            y = np.zeros(rows * n_per_row // block * size, np.uint8)
            n = chunk(code, x.ctypes.data, y.ctypes.data, 0, rows, n_per_row, None)
            assert n == y.size, (t, name, n, y.size)
            res[t + "/" + name] = y
np.savez(out, **res)
"""


def ggml_quantize(tmp, types, cases, halves=None):
    """ggml's bytes for float32 arrays, computed in a torch-free interpreter in directory tmp:
    {"TYPE/NAME": uint8 array} for every (rows, n_per_row) array NAME of `cases` and every
    TYPE of `types` ({name: gguf.GGMLQuantizationType}), and {"f16/NAME": uint16 array} for
    every array of `halves`, converted value by value to half."""
    lib = libggml_base()
    spec = {t: [int(q), *gguf.GGML_QUANT_SIZES[q]] for t, q in types.items()}
    arrays = {f"chunk/{k}": v for k, v in cases.items()}
    arrays.update({f"f16/{k}": v for k, v in (halves or {}).items()})
    inp, out = tmp / "in.npz", tmp / "out.npz"
    np.savez(inp, **arrays)
    run_isolated(QUANTIZE, lib, inp, out, json.dumps(spec))
    with np.load(out) as f:
        return {k: f[k] for k in f.files}


def describe_mismatch(ours, ref, size, block_text):
    """Where two encodings of `size`-byte blocks differ; block_text(i) describes input block i."""
    a, b = ours.reshape(-1, size), ref.reshape(-1, size)
    bad = np.nonzero((a != b).any(axis=1))[0]
    blk = bad[0]
    cols = np.nonzero(a[blk] != b[blk])[0]
    return (f"{len(bad)} of {len(a)} blocks differ; first block {blk}, bytes {cols[:16].tolist()}"
            f"\nours {a[blk][cols[:16]].tolist()}\nref  {b[blk][cols[:16]].tolist()}"
            f"\n{block_text(blk)}")


# ---- block cases -------------------------------------------------------------------------------
# Each generator returns {name: float32 array (rows, n_per_row)}, n_per_row a multiple of
# `block`; those taking an rng draw from it in a fixed order.

def gaussian_blocks(rng, n, block, scale=1.0):
    """n blocks of standard normal values times scale, one per row."""
    return (rng.standard_normal((n, block)) * scale).astype(np.float32)


def regular_cases(rng, block, n, per_row, wide_rows, wide_per_row, zero_at):
    """Ordinary blocks: one per row, several per row, rows of very different magnitudes, and an
    all-zero block between ordinary ones."""
    c = {}
    c[f"normal_{block}"] = gaussian_blocks(rng, n, block)
    c[f"normal_{block * per_row}"] = gaussian_blocks(rng, 4 * per_row, block).reshape(4, -1)
    c["normal_wide_range"] = (rng.standard_normal((wide_rows, wide_per_row * block)) *
                              10.0 ** rng.uniform(-3, 3, (wide_rows, 1))).astype(np.float32)
    z = gaussian_blocks(rng, 4, block)
    z[zero_at] = 0.0
    c["zero_block"] = z.reshape(1, -1)
    return c


def degenerate_cases(block, constants, float_ramp=False):
    """Zeros of either sign, constant blocks, and the largest floats (with float_ramp, also a
    ramp over the whole float range). Draws nothing."""
    c = {}
    c["all_zero"] = np.zeros((2, 2 * block), np.float32)
    c["negative_zero"] = np.full((1, block), -0.0, np.float32)
    c["constant"] = np.stack([np.full(block, v, np.float32) for v in constants])
    rows = [np.full(block, 3.0e38, np.float32),
            np.where(np.arange(block) % 2 == 0, 3.0e38, -3.0e38).astype(np.float32)]
    if float_ramp:
        rows.append(np.linspace(-3.4e38, 3.4e38, block, dtype=np.float32))
    c["float_max"] = np.stack(rows)
    return c


def scaled_cases(rng, prefix, exps, n, block):
    """PREFIX_1eEXP: n normal blocks times 10**EXP, for every EXP."""
    return {f"{prefix}_1e{exp}": gaussian_blocks(rng, n, block, 10.0 ** exp) for exp in exps}


def spread_cases(rng, block, outlier_cols, n_signed, n_offset, uniform_per_row, tie_rows):
    """Outliers, one-signed blocks, uniform values, and values on coarse grids, which make the
    rounding ties of every step likely."""
    c = {}
    o = gaussian_blocks(rng, 3, block)
    for (row, value), col in zip(((0, 100.0), (1, -250.0), (2, 1e4), (2, -1e4)), outlier_cols):
        o[row, col] = value
    c["outlier"] = o
    c["negative_only"] = -np.abs(gaussian_blocks(rng, n_signed, block))
    c["positive_only"] = np.abs(gaussian_blocks(rng, n_signed, block))
    c["positive_offset"] = np.abs(gaussian_blocks(rng, n_offset, block)) + np.float32(3.0)
    c["negative_offset"] = -np.abs(gaussian_blocks(rng, n_offset, block)) - np.float32(3.0)
    c["uniform"] = rng.uniform(-1, 1, (4, uniform_per_row * block)).astype(np.float32)
    c["ties"] = (rng.integers(-16, 16, (tie_rows, block)) * 0.5).astype(np.float32)
    c["ties_small_ints"] = rng.integers(-3, 4, (tie_rows, block)).astype(np.float32)
    return c


def sparse_blocks(rng, n, block, density):
    """n normal blocks with only about `density` of their values non-zero."""
    return (gaussian_blocks(rng, n, block) * (rng.random((n, block)) < density)).astype(np.float32)


def fuzz_blocks(rng, n, block):
    """n blocks, each with its own magnitude and shape (normal, uniform, Student's t, Laplace)."""
    scale = 10.0 ** rng.uniform(-12, 12, (n, 1))
    kind = rng.integers(0, 4, (n, 1))
    base = np.where(kind == 0, rng.standard_normal((n, block)),
                    np.where(kind == 1, rng.uniform(0, 1, (n, block)),
                             np.where(kind == 2, rng.standard_t(2, (n, block)),
                                      rng.laplace(size=(n, block)))))
    return (base * scale).astype(np.float32)
