"""Byte-level conformance of torch.ops.qlora.* with bitsandbytes (pinned, CPU).

bitsandbytes is the oracle: its quantize_4bit / dequantize_4bit outputs must be
identical to ours on random and adversarial tensors, its double-quantized
safetensors checkpoints must dequantize identically through our C++ loader, and
the checkpoints our C++ code writes must load in bitsandbytes.
"""
import os

# bitsandbytes wraps its reference kernels in torch.compile; eager gives the
# same numbers and keeps this suite fast.
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

import math
import pathlib
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

import bitsandbytes.functional as F
from bitsandbytes.functional import QuantState, create_dynamic_map, get_4bit_type

from conftest import REPO, run_tool

BLOCKSIZES = [32, 64, 128, 256, 512, 1024, 2048, 4096]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
QUANT_TYPES = ["nf4", "fp4"]


def bnb_quantize(x, blocksize, quant_type, compress_statistics=False):
    return F.quantize_4bit(x, blocksize=blocksize, quant_type=quant_type,
                           compress_statistics=compress_statistics)


def ours_quantize(x, blocksize, quant_type, storage=torch.uint8):
    return torch.ops.qlora.quantize_4bit(x, blocksize, quant_type, storage)


def adversarial(quant_type, blocksize, dtype, seed):
    """Values on and next to every decision boundary, zero blocks, odd tails."""
    g = torch.Generator().manual_seed(seed)
    code = get_4bit_type(quant_type, device="cpu")
    s = code.sort().values
    mids = (s[:-1] + s[1:]) / 2
    near = torch.cat([mids, torch.nextafter(mids, torch.tensor(2.0)), torch.nextafter(mids, torch.tensor(-2.0)),
                      s, -s])
    parts = []
    for scale in [1.0, 3.7, 1e-3, 1e4]:
        block = near[torch.randint(len(near), (blocksize,), generator=g)] * scale
        block[0] = scale  # pins absmax so the scaled values sit on the boundaries
        parts.append(block)
    parts.append(torch.zeros(blocksize))                      # all-zero block
    parts.append(torch.randn(blocksize, generator=g) * 1e-30)  # tiny magnitudes
    parts.append(torch.full((blocksize,), -0.0))               # negative zeros
    parts.append(torch.randn(blocksize // 2 + 3, generator=g))  # odd partial tail
    return torch.cat(parts).to(dtype)


def test_codebooks_match_bitsandbytes():
    """csrc/common/codebooks.h holds bitsandbytes' exact float32 tables."""
    text = (REPO / "csrc/common/codebooks.h").read_text()

    def macro(name):
        body = re.search(rf"#define {name} ((?:.*\\\n)*.*)", text).group(1).replace("\\\n", " ")
        return [float.fromhex(v.strip().rstrip("f")) if "x" in v else float(v.strip().rstrip("f"))
                for v in body.split(",")]

    nf4, fp4 = get_4bit_type("nf4", device="cpu"), get_4bit_type("fp4", device="cpu")
    assert macro("QLORA_NF4_VALUES") == nf4.tolist()
    assert macro("QLORA_FP4_VALUES") == fp4.tolist()
    order = torch.argsort(fp4)
    assert [int(v) for v in macro("QLORA_FP4_ORDER")] == order.tolist()
    assert macro("QLORA_NF4_BOUNDS") == ((nf4[:-1] + nf4[1:]) / 2).tolist()
    assert macro("QLORA_FP4_BOUNDS") == ((fp4[order][:-1] + fp4[order][1:]) / 2).tolist()
    for signed, name in [(True, "SIGNED"), (False, "UNSIGNED")]:
        dmap = create_dynamic_map(signed=signed)
        assert macro(f"QLORA_DYNAMIC_{name}_VALUES") == dmap.tolist()
        assert macro(f"QLORA_DYNAMIC_{name}_BOUNDS") == ((dmap[:-1] + dmap[1:]) / 2).tolist()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
def test_quantize_4bit_bytes_identical(dtype, quant_type, blocksize):
    torch.manual_seed(blocksize)
    inputs = [
        torch.randn(3 * blocksize + 1, dtype=torch.float32).to(dtype),        # odd, partial block
        (torch.randn(17, 2 * blocksize) * 0.02).to(dtype),                     # weight-like
        torch.rand(5, dtype=torch.float32).to(dtype),                          # smaller than a block
        adversarial(quant_type, blocksize, dtype, seed=blocksize),
    ]
    for x in inputs:
        ref_packed, ref_state = bnb_quantize(x, blocksize, quant_type)
        packed, absmax = ours_quantize(x, blocksize, quant_type)
        assert packed.shape == ref_packed.shape and packed.dtype == ref_packed.dtype
        assert torch.equal(packed, ref_packed), f"{(packed != ref_packed).sum()} bytes differ"
        assert torch.equal(absmax, ref_state.absmax)


@pytest.mark.parametrize("out_dtype", DTYPES)
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
def test_dequantize_4bit_identical(out_dtype, quant_type, blocksize):
    torch.manual_seed(blocksize + 1)
    for shape in [(4, 2 * blocksize), (3 * blocksize + 1,), (7, 3)]:
        x = torch.randn(shape)
        packed, state = bnb_quantize(x, blocksize, quant_type)
        ref = torch.ops.bitsandbytes.dequantize_4bit(packed, state.absmax, blocksize, quant_type, list(shape),
                                                     out_dtype)
        ours = torch.ops.qlora.dequantize_4bit(packed, state.absmax, blocksize, quant_type, list(shape), out_dtype)
        assert ours.shape == torch.Size(shape) and ours.dtype == out_dtype
        # bitsandbytes' native CPU kernel returns 1-D shapes as [1, n]; values are what count.
        assert torch.equal(ours.flatten(), ref.flatten())


@pytest.mark.parametrize("storage", [torch.uint8, torch.float32, torch.bfloat16, torch.int8])
def test_quant_storage_matches(storage):
    x = torch.randn(64, 128)
    ref_packed, ref_state = F.quantize_4bit(x, blocksize=64, quant_type="nf4", quant_storage=storage)
    packed, absmax = ours_quantize(x, 64, "nf4", storage)
    assert packed.dtype == storage and packed.shape == ref_packed.shape
    assert torch.equal(packed.view(torch.uint8), ref_packed.view(torch.uint8))


def _exact_blockwise_reference(x, code, blocksize):
    """Independent statement of the exact rule: nearest code by float32 midpoints, ties down."""
    flat = x.flatten().float()
    n = flat.numel()
    bounds = (code[:-1] + code[1:]) / 2
    out = torch.empty(n, dtype=torch.uint8)
    absmax = torch.empty((n + blocksize - 1) // blocksize)
    for b in range(absmax.numel()):
        seg = flat[b * blocksize:(b + 1) * blocksize]
        am = seg.abs().max()
        if seg.numel() < blocksize:
            am = am.clamp(min=1e-38)
            v = torch.clamp(seg / am, -1, 1)
        else:
            v = torch.clamp(seg * (1.0 / am.clamp(min=1e-38)), -1, 1)
        absmax[b] = am
        out[b * blocksize:(b + 1) * blocksize] = torch.bucketize(v, bounds).to(torch.uint8)
    return out.view(x.shape), absmax


def test_blockwise8_is_exact_and_agreement_with_bnb_lut_is_reported():
    torch.manual_seed(7)
    code = create_dynamic_map(signed=True)
    rates = {}
    for dist, blocksize in [("normal", 64), ("normal", 256), ("heavy-tailed", 256), ("heavy-tailed", 4096)]:
        x = torch.randn(40_000)
        if dist == "heavy-tailed":  # wide dynamic range, like optimizer moments
            x = x * torch.rand(40_000) ** 4
        q, absmax = torch.ops.qlora.quantize_blockwise(x, code, blocksize)
        ref_q, ref_absmax = _exact_blockwise_reference(x, code, blocksize)
        assert torch.equal(q, ref_q) and torch.equal(absmax, ref_absmax)
        bnb_q, bnb_absmax = torch.ops.bitsandbytes.quantize_blockwise(x, code, blocksize)
        assert torch.equal(absmax, bnb_absmax)
        rates[(dist, blocksize)] = (q == bnb_q).float().mean().item()
        # Where the LUT picks another code, ours is never further from x.
        deq = torch.ops.qlora.dequantize_blockwise(q, absmax, code, blocksize, torch.float32)
        bnb_deq = torch.ops.bitsandbytes.dequantize_blockwise(bnb_q, bnb_absmax, code, blocksize, torch.float32)
        assert torch.all((deq - x).abs() <= (bnb_deq - x).abs() + 1e-12)
    print("\n8-bit blockwise, codes equal to bitsandbytes' CPU LUT quantizer:")
    for (dist, blocksize), rate in rates.items():
        print(f"  {dist:>12} blocksize {blocksize:>4}: {rate:.4%}")
    # The LUT is an approximation of this very rule; far below this means a bug.
    assert min(rates.values()) > 0.8


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_double_quant_checkpoint_from_bnb_dequantizes_identically_in_cpp(tmp_path, quant_type, dtype):
    torch.manual_seed(11)
    w = (torch.randn(96, 200) * 0.05).to(dtype)
    packed, state = bnb_quantize(w, 64, quant_type, compress_statistics=True)
    tensors = {"model.layers.0.mlp.up_proj.weight": packed}
    for k, v in state.as_dict(packed=True).items():
        tensors[f"model.layers.0.mlp.up_proj.weight.{k}"] = v
    src = tmp_path / "bnb.safetensors"
    save_file(tensors, str(src))
    out = tmp_path / "ours.safetensors"
    res = run_tool("quant_state_tool", "dequantize", src, "model.layers.0.mlp.up_proj.weight", out)
    assert res.returncode == 0, res.stderr
    ours = load_file(str(out))["dequantized"]
    ref = F.dequantize_4bit(packed, state)
    assert ours.dtype == ref.dtype == dtype
    assert torch.equal(ours, ref)


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("double_quant", [False, True])
def test_cpp_written_checkpoint_loads_in_bnb(tmp_path, quant_type, double_quant):
    torch.manual_seed(12)
    w = (torch.randn(64, 320) * 0.05).to(torch.bfloat16)
    src = tmp_path / "dense.safetensors"
    save_file({"w": w}, str(src))
    out = tmp_path / "quantized.safetensors"
    res = run_tool("quant_state_tool", "quantize", src, "w", out, 64, quant_type, int(double_quant))
    assert res.returncode == 0, res.stderr
    sd = load_file(str(out))
    packed = sd.pop("w")
    state = QuantState.from_dict({k[2:]: v for k, v in sd.items()}, device=torch.device("cpu"))
    ref_packed, ref_state = bnb_quantize(w, 64, quant_type, compress_statistics=double_quant)
    assert torch.equal(packed, ref_packed)
    assert state.shape == w.shape and state.dtype == w.dtype and state.blocksize == 64
    expected = {f"{k}" for k in ref_state.as_dict(packed=True)}
    assert {k[2:] for k in sd} == expected
    ref_json = ref_state.as_dict(packed=True)[f"quant_state.bitsandbytes__{quant_type}"]
    assert bytes(sd[f"w.quant_state.bitsandbytes__{quant_type}"].tolist()) == bytes(ref_json.tolist())
    # bitsandbytes dequantizes our checkpoint to what we dequantize it to.
    ours = torch.ops.qlora.dequantize_4bit(packed, state.absmax if not double_quant else
                                           F.dequantize_blockwise(state.absmax, state.state2) + state.offset,
                                           64, quant_type, list(w.shape), w.dtype)
    assert torch.equal(F.dequantize_4bit(packed, state), ours)
    if double_quant:
        agree = (state.absmax == ref_state.absmax).float().mean().item()
        print(f"\nnested absmax codes equal to bitsandbytes' LUT quantizer: {agree:.4%}")
        assert agree > 0.95


def test_malformed_checkpoint_is_a_clear_error(tmp_path):
    w = torch.randn(16, 64)
    packed, state = bnb_quantize(w, 64, "nf4", compress_statistics=True)
    tensors = {"w": packed, **{f"w.{k}": v for k, v in state.as_dict(packed=True).items()}}
    del tensors["w.nested_absmax"]
    src = tmp_path / "bad.safetensors"
    save_file(tensors, str(src))
    res = run_tool("quant_state_tool", "dequantize", src, "w", tmp_path / "out.safetensors")
    assert res.returncode == 1
    assert "w.absmax" in res.stderr and "float32" in res.stderr
    assert not (tmp_path / "out.safetensors").exists()


# ---- the rest of bitsandbytes' op surface: gemm_4bit, the .out overloads,
# ---- the fused optimizer updates (bitsandbytes' CPU kernels as the oracle)

def _nested_stats(quant_type, dtype, out_f=96, in_f=640, blocksize=64):
    torch.manual_seed(7)
    w = (torch.randn(out_f, in_f) * 0.03).to(dtype)
    packed, qs = bnb_quantize(w, blocksize, quant_type, compress_statistics=True)
    return w, packed, qs


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 7])
def test_gemm_4bit_with_double_quantised_statistics_matches_bnb(quant_type, dtype, rows):
    w, packed, qs = _nested_stats(quant_type, dtype)
    x = torch.randn(rows, w.shape[1]).to(dtype)
    bias = torch.randn(w.shape[0]).to(dtype)
    offset = qs.offset.reshape(()).to(torch.float32)
    args = (x, packed, list(w.shape), qs.state2.absmax, qs.blocksize, quant_type, bias,
            qs.absmax, qs.state2.code, offset)
    ref = torch.ops.bitsandbytes.gemm_4bit(*args)
    got = torch.ops.qlora.gemm_4bit(*args)
    assert got.dtype == ref.dtype and got.shape == ref.shape
    # Same dequantised weight (the statistics decode bit for bit); the GEMMs
    # differ only in summation order.
    full_absmax = F.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset
    w_ref = torch.ops.bitsandbytes.dequantize_4bit(packed, full_absmax, qs.blocksize, quant_type,
                                                   list(w.shape), dtype)
    w_ours = torch.ops.qlora.dequantize_4bit(packed, full_absmax, qs.blocksize, quant_type,
                                             list(w.shape), dtype)
    assert torch.equal(w_ours, w_ref)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), ref.float(), rtol=tol, atol=tol)
    # ... and equals our matmul_4bit on the undone statistics exactly.
    same = torch.ops.qlora.matmul_4bit(x, packed, full_absmax, qs.blocksize, quant_type,
                                       list(w.shape), bias)
    assert torch.equal(got, same)


def test_gemm_4bit_with_float_statistics_matches_bnb():
    torch.manual_seed(8)
    w = torch.randn(64, 256) * 0.05
    packed, qs = bnb_quantize(w, 64, "nf4")
    x = torch.randn(5, 256)
    ref = torch.ops.bitsandbytes.gemm_4bit(x, packed, [64, 256], qs.absmax, 64, "nf4")
    got = torch.ops.qlora.gemm_4bit(x, packed, [64, 256], qs.absmax, 64, "nf4")
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_gemm_4bit_is_differentiable_in_A_and_bias_like_matmul_4bit():
    w, packed, qs = _nested_stats("nf4", torch.float32)
    offset = qs.offset.reshape(()).to(torch.float32)
    full_absmax = F.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset
    x1 = torch.randn(3, 4, w.shape[1], requires_grad=True)
    b1 = torch.randn(w.shape[0], requires_grad=True)
    x2, b2 = x1.detach().clone().requires_grad_(), b1.detach().clone().requires_grad_()
    y1 = torch.ops.qlora.gemm_4bit(x1, packed, list(w.shape), qs.state2.absmax, 64, "nf4", b1,
                                   qs.absmax, qs.state2.code, offset)
    y2 = torch.ops.qlora.matmul_4bit(x2, packed, full_absmax, 64, "nf4", list(w.shape), b2)
    g = torch.randn_like(y1)
    y1.backward(g)
    y2.backward(g)
    assert torch.equal(x1.grad, x2.grad) and torch.equal(b1.grad, b2.grad)


def test_gemm_4bit_bad_statistics_are_clear_errors():
    w, packed, qs = _nested_stats("nf4", torch.float32)
    x = torch.randn(2, w.shape[1])
    with pytest.raises(RuntimeError, match="absmax_code is required"):
        torch.ops.qlora.gemm_4bit(x, packed, list(w.shape), qs.state2.absmax, 64, "nf4", None,
                                  qs.absmax)
    with pytest.raises(RuntimeError, match="absmax_8bit has"):
        torch.ops.qlora.gemm_4bit(x, packed, list(w.shape), qs.state2.absmax, 64, "nf4", None,
                                  qs.absmax[:-1], qs.state2.code, qs.offset.reshape(()).float())


@pytest.mark.parametrize("dtype", DTYPES)
def test_out_overloads_match_bnb(dtype):
    torch.manual_seed(9)
    code = create_dynamic_map(signed=True)
    x = torch.randn(1000)
    q, absmax = torch.ops.qlora.quantize_blockwise(x, code, 256)
    out = torch.empty(1000, dtype=dtype)
    torch.ops.qlora.dequantize_blockwise.out(q, absmax, code, 256, dtype, out)
    # (bitsandbytes registers its .out overloads for CUDA only: its functional op is the oracle)
    ref = torch.ops.bitsandbytes.dequantize_blockwise(q, absmax, code, 256, dtype)
    assert torch.equal(out, ref)
    w = torch.randn(48, 128) * 0.05
    packed, qs = bnb_quantize(w, 64, "nf4")
    a = torch.randn(1, 128).to(dtype)
    got = torch.empty(1, 48, dtype=dtype)
    torch.ops.qlora.gemv_4bit.out(a, packed, [48, 128], qs.absmax, qs.code, 64, got)
    assert torch.equal(got, torch.ops.qlora.gemv_4bit(a, packed, [48, 128], qs.absmax, qs.code, 64))
    ref = torch.ops.bitsandbytes.gemv_4bit(a, packed, [48, 128], qs.absmax, qs.code, 64)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), ref.float(), rtol=tol, atol=tol)
    with pytest.raises(RuntimeError, match="out must have shape"):
        torch.ops.qlora.gemv_4bit.out(a, packed, [48, 128], qs.absmax, qs.code, 64,
                                      torch.empty(2, 48, dtype=dtype))


def _adam_case(n, seed, steps=4):
    torch.manual_seed(seed)
    p = torch.randn(n)
    grads = [torch.randn(n) * 0.1 for _ in range(steps)]
    return p, grads


ADAM = dict(beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, lr=1e-3)


def test_optimizer_update_32bit_tracks_bnb():
    p, grads = _adam_case(5000, 10)
    ours, ref = p.clone(), p.clone()
    s_ours = [torch.zeros(5000), torch.zeros(5000)]
    s_ref = [torch.zeros(5000), torch.zeros(5000)]
    for step, g in enumerate(grads, start=1):
        for op, pp, (m, v) in ((torch.ops.qlora, ours, s_ours), (torch.ops.bitsandbytes, ref, s_ref)):
            op.optimizer_update_32bit("adam", g.clone(), pp, m, v, None, 0.0, 0.0, ADAM["beta1"],
                                      ADAM["beta2"], 0.0, 0.0, ADAM["eps"], ADAM["weight_decay"],
                                      step, ADAM["lr"], 1.0)
    # Same algorithm, different rounding order (bitsandbytes folds the bias
    # corrections into eps and the step size).
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(s_ours[0], s_ref[0], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(s_ours[1], s_ref[1], rtol=1e-5, atol=1e-9)


def test_optimizer_update_8bit_blockwise_tracks_bnb():
    n = 256 * 20 + 77  # a partial last block
    p, grads = _adam_case(n, 11, steps=30)
    m1, m2 = create_dynamic_map(signed=True), create_dynamic_map(signed=False)
    blocks = -(-n // 256)
    ours, ref = p.clone(), p.clone()
    st_ours = [torch.zeros(n, dtype=torch.uint8) + 127, torch.zeros(n, dtype=torch.uint8),
               torch.zeros(blocks), torch.zeros(blocks)]
    st_ref = [t.clone() for t in st_ours]
    for step, g in enumerate(grads, start=1):
        for op, pp, (q1, q2, a1, a2) in ((torch.ops.qlora, ours, st_ours),
                                         (torch.ops.bitsandbytes, ref, st_ref)):
            op.optimizer_update_8bit_blockwise("adam", g.clone(), pp, q1, q2, ADAM["beta1"],
                                               ADAM["beta2"], 0.0, 0.0, ADAM["eps"], step,
                                               ADAM["lr"], m1, m2, a1, a2, ADAM["weight_decay"],
                                               1.0)
    # test_optimizer_bnb.py's stated tolerance: within 2% of how far the
    # weights moved (the two pick nearest codes by different rules:
    # bitsandbytes' CPU library by a lookup table).
    moved = (ref - p).abs().max().item()
    assert (ours - ref).abs().max().item() <= 0.02 * moved


def test_optimizer_update_rejects_what_it_does_not_do():
    p = torch.zeros(10)
    with pytest.raises(RuntimeError, match='optimizer_name "lion" is not supported'):
        torch.ops.qlora.optimizer_update_32bit("lion", p.clone(), p, p.clone(), p.clone(), None,
                                               0.0, 0.0, 0.9, 0.99, 0, 0, 1e-8, 0, 1, 1e-3, 1.0)
    with pytest.raises(RuntimeError, match="max_unorm"):
        torch.ops.qlora.optimizer_update_32bit("adam", p.clone(), p, p.clone(), p.clone(), None,
                                               1.0, 0.0, 0.9, 0.99, 0, 0, 1e-8, 0, 1, 1e-3, 1.0)
    with pytest.raises(RuntimeError, match="step counts from 1"):
        torch.ops.qlora.optimizer_update_32bit("adam", p.clone(), p, p.clone(), p.clone(), None,
                                               0.0, 0.0, 0.9, 0.99, 0, 0, 1e-8, 0, 0, 1e-3, 1.0)
