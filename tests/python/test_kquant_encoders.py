"""Our Q4_K / Q5_K / Q6_K encoders (csrc/io/ggml_kquants.cpp) against ggml's own reference
quantizers, the ones llama-quantize runs without an importance matrix: the encoded bytes must
be identical, for ordinary rows and for the corner cases of the algorithm (all-zero and constant
blocks, scales that underflow or overflow a half, outliers, one-signed blocks, ties).

The encoder is built here into a small torch-free harness (tests/tools/kquant_harness.cpp). The
oracle is ggml_quantize_chunk from llama-cpp-python's libggml-base, called through ctypes in a
separate interpreter that never imports torch (llama.cpp has died with SIGILL in a process that
had libtorch loaded). gguf-py decodes our bytes as a sanity check on the layouts.
"""
import subprocess

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

import ggml_oracle

TYPES = {"q4_k": Q.Q4_K, "q5_k": Q.Q5_K, "q6_k": Q.Q6_K}
QK_K = 256


def make_cases():
    """name -> float32 array of shape (rows, n_per_row)."""
    rng = np.random.default_rng(20240607)
    c = ggml_oracle.regular_cases(rng, QK_K, n=6, per_row=4, wide_rows=8, wide_per_row=4,
                                  zero_at=1)
    z = ggml_oracle.gaussian_blocks(rng, 2, QK_K)
    z[0, 64:96] = 0.0  # one zero sub-block (Q4_K/Q5_K) = two (Q6_K)
    z[1, 16:32] = 0.0
    c["zero_sub_block"] = z

    c.update(ggml_oracle.degenerate_cases(QK_K, constants=(0.7, -1.3, 1e-3, -5e4, 1.0,
                                                           2.0 ** -10)))
    sub = np.repeat(rng.standard_normal((2, 8)).astype(np.float32), 32, axis=1)
    c["constant_sub_blocks"] = sub  # each 32-element sub-block constant, all different

    # Halves go subnormal, then to 0.
    c.update(ggml_oracle.scaled_cases(rng, "tiny", (-4, -6, -8, -12, -20, -30, -38, -40, -44),
                                      2, QK_K))
    mixed = ggml_oracle.gaussian_blocks(rng, 2, QK_K)
    mixed[0, 32:64] *= 1e-6  # a sub-block whose 6-bit scale rounds to 0
    mixed[1, 128:144] *= 1e-7
    mixed[1, 200:232] *= 1e-4
    c["mixed_magnitudes"] = mixed

    # Halves overflow, squares overflow.
    c.update(ggml_oracle.scaled_cases(rng, "huge", (3, 4, 5, 6, 8, 9, 12, 18, 20, 30, 37), 2,
                                      QK_K))
    c.update(ggml_oracle.spread_cases(rng, QK_K, outlier_cols=(17, 200, 5, 130), n_signed=3,
                                      n_offset=2, uniform_per_row=1, tie_rows=4))
    c["sparse"] = ggml_oracle.sparse_blocks(rng, 4, QK_K, 0.05)
    c["fuzz"] = ggml_oracle.fuzz_blocks(rng, 256, QK_K).reshape(64, 1024)
    return c


CASES = make_cases()


def half_probe_values():
    """float32 values probing every half: each finite half, the midpoints to its neighbours
    and the floats one ulp either side of them, plus random bit patterns (NaNs included)."""
    halves = np.arange(0x7C01, dtype=np.uint16).view(np.float16).astype(np.float64)
    mids = (halves[:-1] + halves[1:]) / 2
    mids = np.append(mids, 65520.0)
    m = mids.astype(np.float32)
    vals = np.concatenate([halves.astype(np.float32), m, np.nextafter(m, np.float32(np.inf)),
                           np.nextafter(m, np.float32(0)),
                           np.array([np.inf, 2.0 ** -25, 2.0 ** -26, 1e-45, 3e38], np.float32)])
    vals = np.concatenate([vals, -vals])
    bits = np.random.default_rng(7).integers(0, 2 ** 32, 1 << 20, dtype=np.uint64)
    return np.concatenate([vals, bits.astype(np.uint32).view(np.float32)])


HALF_PROBES = half_probe_values()


@pytest.fixture(scope="module")
def oracle(tmp_path_factory):
    """ggml's bytes for every case and type: {"q4_k/name": uint8 array, "f16/probes": uint16}."""
    return ggml_oracle.ggml_quantize(tmp_path_factory.mktemp("kquant_oracle"), TYPES, CASES,
                                     halves={"probes": HALF_PROBES})


# The flags of libqlora, and an aggressive build to show the result does not depend on the
# optimiser or the ISA once contraction is off.
BUILDS = {"O2": ["-O2"], "O3_native": ["-O3", "-march=native"]}


@pytest.fixture(scope="module", params=list(BUILDS))
def harness(request, tmp_path_factory):
    return ggml_oracle.build_harness(tmp_path_factory, "kquant_harness", ["io/ggml_kquants.cpp"],
                                     opt=BUILDS[request.param])


def run_harness(exe, kind, x, tmp_path):
    """(bytes, decoded floats or None) from our encoder for float32 array x."""
    inp, out, dec = tmp_path / "in.f32", tmp_path / "out.bin", tmp_path / "dec.f32"
    np.ascontiguousarray(x, dtype=np.float32).tofile(inp)
    args = [str(exe), kind, str(inp), str(out)] + ([] if kind == "f16" else [str(dec)])
    p = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    data = np.fromfile(out, dtype=np.uint8)
    return data, (None if kind == "f16" else np.fromfile(dec, dtype=np.float32))


def describe_mismatch(kind, ours, ref, x):
    return ggml_oracle.describe_mismatch(
        ours, ref, gguf.GGML_QUANT_SIZES[TYPES[kind]][1],
        lambda blk: f"block amax {np.abs(x.reshape(-1, QK_K)[blk]).max():g}")


@pytest.mark.parametrize("kind", list(TYPES))
@pytest.mark.parametrize("case", list(CASES))
def test_bytes_match_ggml(harness, oracle, tmp_path, kind, case):
    x = CASES[case]
    ours, decoded = run_harness(harness, kind, x, tmp_path)
    ref = oracle[f"{kind}/{case}"]
    assert ours.size == ref.size
    if not np.array_equal(ours, ref):
        pytest.fail(describe_mismatch(kind, ours, ref, x))

    # Our decoders (common/ggml_blocks.h) and gguf-py's read the bytes the same way.
    rows = x.shape[0]
    with np.errstate(invalid="ignore", over="ignore"):  # inf * 0 where a half overflowed
        theirs = gguf.quants.dequantize(ours.reshape(rows, -1), TYPES[kind]).reshape(-1)
    np.testing.assert_array_equal(decoded.view(np.uint32), theirs.view(np.uint32))


# Per-type bound on |decoded - x| relative to each block's largest |x|, for inputs whose scales
# stay in the normal range of a half.
TOLERANCE = {"q4_k": 0.15, "q5_k": 0.08, "q6_k": 0.03}
SANE_CASES = ["normal_256", "normal_1024", "normal_wide_range", "zero_block", "zero_sub_block",
              "all_zero", "constant", "constant_sub_blocks", "mixed_magnitudes",
              "huge_1e3", "huge_1e4", "outlier", "negative_only", "positive_only",
              "positive_offset", "negative_offset", "uniform", "ties", "ties_small_ints",
              "sparse"]


@pytest.mark.parametrize("kind", list(TYPES))
@pytest.mark.parametrize("case", SANE_CASES)
def test_dequantized_close_to_input(harness, tmp_path, kind, case):
    x = CASES[case]
    ours, _ = run_harness(harness, kind, x, tmp_path)
    y = gguf.quants.dequantize(ours.reshape(x.shape[0], -1), TYPES[kind]).reshape(-1, QK_K)
    xb = x.reshape(-1, QK_K).astype(np.float64)
    err = np.abs(y - xb).max(axis=1)
    amax = np.abs(xb).max(axis=1)
    worst = (err / np.where(amax > 0, amax, 1)).max()
    assert worst <= TOLERANCE[kind], f"worst relative error {worst:.4f}"
    assert np.all(err[amax == 0] == 0)


def test_fp32_to_fp16_matches_ggml(harness, oracle, tmp_path):
    x = HALF_PROBES
    ours, _ = run_harness(harness, "f16", x, tmp_path)
    ref = oracle["f16/probes"]
    ours = ours.view(np.uint16)
    bad = np.nonzero(ours != ref)[0]
    assert bad.size == 0, (f"{bad.size} values differ, e.g. {x[bad[:8]].tolist()}: ours "
                           f"{[hex(v) for v in ours[bad[:8]]]}, ggml "
                           f"{[hex(v) for v in ref[bad[:8]]]}")
