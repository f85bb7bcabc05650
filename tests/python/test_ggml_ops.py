"""torch.ops.qlora.ggml_dequantize / ggml_matmul (a base kept in a GGUF tensor's own ggml
blocks) against gguf-py 0.19.0: the dequantised values bit for bit for every type at every
CPU capability level this machine has, the matmul against float64 arithmetic on gguf-py's
weights, and the op as PyTorch sees it (opcheck, gradcheck, torch.compile, torch.export).

Blocks come from gguf.quants.quantize where gguf-py can quantise, and as random bytes with
finite f16 scales for every type (every nibble and bit pattern, not only what a quantiser
produces).
"""
import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from torch.library import opcheck

import conftest  # noqa: F401  (loads libqlora_ops)

qlora = torch.ops.qlora
LEVELS = ["portable", "avx2", "avx512", "avx512_bf16"]

QUANTISABLE = [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1]
TYPES = QUANTISABLE + [Q.Q4_K, Q.Q5_K, Q.Q6_K]
# The f16 scale fields (byte offsets in a block) that random blocks keep finite.
HALF_FIELDS = {Q.Q8_0: [0], Q.Q4_0: [0], Q.Q4_1: [0, 2], Q.Q5_0: [0], Q.Q5_1: [0, 2],
               Q.Q4_K: [0, 2], Q.Q5_K: [0, 2], Q.Q6_K: [208]}


def random_blocks(qtype, rows, cols, rng, max_half_bits=0x7C00):
    """Random blocks; the f16 scales finite and below the f16 of bit pattern max_half_bits."""
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    n = rows * cols // block_size
    if qtype in (Q.F32, Q.F16, Q.BF16):  # finite values of the type, as bytes
        v = rng.standard_normal(rows * cols).astype(np.float32)
        data = gguf.quants.quantize(v.reshape(rows, cols), qtype)
        return np.ascontiguousarray(data).view(np.uint8).reshape(rows, -1)
    blocks = rng.integers(0, 256, (n, type_size), dtype=np.uint8)
    for at in HALF_FIELDS[qtype]:
        bits = rng.integers(0, max_half_bits, n) | (rng.integers(0, 2, n) << 15)
        blocks[:, at:at + 2] = bits.astype(np.uint16).view(np.uint8).reshape(-1, 2)
    return blocks.reshape(rows, cols // block_size * type_size)


def quantised_blocks(qtype, rows, cols, rng):
    w = (rng.standard_normal((rows, cols)) * 0.05).astype(np.float32)
    w[0, :32] = 0.0  # an all-zero block
    data = gguf.quants.quantize(w, qtype)
    return np.ascontiguousarray(data).view(np.uint8).reshape(rows, -1)


def reference(blocks, qtype, rows, cols):
    """gguf-py's float32 dequantisation of the [rows, row bytes] uint8 blocks."""
    ref = gguf.quants.dequantize(blocks, qtype)
    return torch.from_numpy(np.ascontiguousarray(ref, dtype=np.float32).reshape(rows, cols))


def cases(seed=0, max_half_bits=0x7C00):
    rng = np.random.default_rng(seed)
    for qtype in TYPES:
        bs = gguf.GGML_QUANT_SIZES[qtype][0]
        cols = max(256, bs) * 2
        yield qtype, "random", random_blocks(qtype, 6, cols, rng, max_half_bits), 6, cols
        if qtype in QUANTISABLE and qtype not in (Q.F32, Q.F16, Q.BF16):
            yield qtype, "quantised", quantised_blocks(qtype, 5, cols, rng), 5, cols


CASES = list(cases())
IDS = [f"{c[0].name}-{c[1]}" for c in CASES]
# Scales below 2^-7 for the matmuls: products and sums stay finite in float16.
MATMUL_CASES = list(cases(seed=1, max_half_bits=0x2000))


def available_levels():
    top = qlora.cpu_capability()
    return LEVELS[:LEVELS.index(top) + 1]


@pytest.fixture
def every_level():
    """Runs the test body once per level (the cap restored afterwards)."""
    top = qlora.cpu_capability()
    levels = available_levels()
    yield levels
    qlora.cpu_capability(top)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_dequantize_equals_gguf_py_bit_for_bit_at_every_level(case, every_level):
    qtype, _, blocks, rows, cols = case
    ref = reference(blocks, qtype, rows, cols)
    t = torch.from_numpy(blocks)
    for level in every_level:
        qlora.cpu_capability(level)
        ours = qlora.ggml_dequantize(t, qtype.name, [rows, cols], torch.float32)
        assert ours.dtype == torch.float32 and ours.shape == (rows, cols)
        assert torch.equal(ours.view(torch.int32), ref.view(torch.int32)), (
            f"{qtype.name} at {level}: {(ours != ref).sum().item()} values differ")
        for dtype in (torch.bfloat16, torch.float16):
            rounded = qlora.ggml_dequantize(t, qtype.name.lower(), [rows, cols], dtype)
            expected = ref.to(dtype)  # one rounding, as torch's .to()
            assert torch.equal(rounded.view(torch.int16), expected.view(torch.int16)), (
                f"{qtype.name} -> {dtype} at {level}")


@pytest.mark.parametrize("case", MATMUL_CASES, ids=IDS)
def test_matmul_equals_float64_product_of_gguf_py_weights(case, every_level):
    qtype, _, blocks, rows, cols = case
    w = reference(blocks, qtype, rows, cols).double()
    torch.manual_seed(0)
    x = torch.randn(2, 3, cols)
    bias = torch.randn(rows)
    t = torch.from_numpy(blocks)
    exact = x.double() @ w.T + bias.double()
    scale = (x.double().abs() @ w.abs().T).max().item() + 1.0
    for level in every_level:
        qlora.cpu_capability(level)
        y = qlora.ggml_matmul(x, t, qtype.name, [rows, cols], bias)
        assert y.shape == (2, 3, rows) and y.dtype == torch.float32
        assert (y.double() - exact).abs().max().item() <= 1e-5 * scale, level
        for dtype, tol in ((torch.bfloat16, 2e-2), (torch.float16, 4e-3)):
            xd = x.to(dtype)
            wd = w.to(dtype).double()  # the weights rounded to x's dtype, as documented
            want = xd.double() @ wd.T
            got = qlora.ggml_matmul(xd, t, qtype.name, [rows, cols], None)
            assert got.dtype == dtype
            assert (got.double() - want).abs().max().item() <= tol * scale, (level, dtype)


def test_single_row_and_large_weights_are_chunked_correctly():
    """A weight beyond one expansion chunk (4 M weights) and a single input row."""
    rng = np.random.default_rng(3)
    rows, cols = 4096 + 40, 1280  # 5.2 M weights: two chunks, the second partial
    blocks = quantised_blocks(Q.Q4_0, rows, cols, rng)
    w = reference(blocks, Q.Q4_0, rows, cols)
    t = torch.from_numpy(blocks)
    for shape in [(1, cols), (7, cols)]:
        x = torch.randn(*shape)
        torch.testing.assert_close(qlora.ggml_matmul(x, t, "Q4_0", [rows, cols]), x @ w.T,
                                   rtol=1e-5, atol=1e-4)


def sample_calls():
    rng = np.random.default_rng(1)
    for qtype in (Q.Q4_0, Q.Q6_K):
        blocks = torch.from_numpy(random_blocks(qtype, 8, 512, rng, max_half_bits=0x2000))
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            yield qlora.ggml_dequantize.default, (blocks, qtype.name, [8, 512], dtype)
            for rows in [(1, 512), (2, 3, 512)]:
                x = torch.randn(*rows).to(dtype).requires_grad_()
                bias = torch.randn(8).to(dtype).requires_grad_()
                yield qlora.ggml_matmul.default, (x, blocks, qtype.name, [8, 512], bias)
                yield qlora.ggml_matmul.default, (x, blocks, qtype.name, [8, 512], None)


@pytest.mark.parametrize("call", list(sample_calls()), ids=lambda c: str(c[0]))
def test_opcheck(call):
    op, args = call
    opcheck(op, args)


def test_gradcheck_wrt_input_and_bias():
    rng = np.random.default_rng(2)
    blocks = torch.from_numpy(quantised_blocks(Q.Q5_1, 6, 64, rng))
    x = torch.randn(3, 64, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(6, dtype=torch.float64, requires_grad=True)
    f = lambda x, b: qlora.ggml_matmul(x, blocks, "Q5_1", [6, 64], b)  # noqa: E731
    assert torch.autograd.gradcheck(f, (x, bias))
    assert torch.autograd.gradgradcheck(f, (x, bias))


def test_backward_is_grad_out_times_dequantised_weight():
    rng = np.random.default_rng(4)
    blocks = random_blocks(Q.Q4_K, 16, 512, rng)
    w = reference(blocks, Q.Q4_K, 16, 512)
    x = torch.randn(5, 512, requires_grad=True)
    g = torch.randn(5, 16)
    qlora.ggml_matmul(x, torch.from_numpy(blocks), "Q4_K", [16, 512]).backward(g)
    torch.testing.assert_close(x.grad, g @ w, rtol=1e-5, atol=1e-5)


def test_dequantize_is_not_differentiable():
    blocks = torch.from_numpy(random_blocks(Q.Q8_0, 2, 64, np.random.default_rng(5)))
    w = qlora.ggml_dequantize(blocks, "Q8_0", [2, 64], torch.float32)
    assert not w.requires_grad


class GgmlLinear(torch.nn.Module):
    def __init__(self):
        super().__init__()
        rng = np.random.default_rng(6)
        self.register_buffer("blocks", torch.from_numpy(random_blocks(Q.Q5_K, 32, 512, rng)))
        self.bias = torch.nn.Parameter(torch.randn(32))

    def forward(self, x):
        return torch.relu(qlora.ggml_matmul(x, self.blocks, "Q5_K", [32, 512], self.bias))


def test_torch_compile_fullgraph_forward_and_backward():
    m = GgmlLinear()
    x = torch.randn(4, 7, 512, requires_grad=True)
    eager = m(x)
    eager.sum().backward()
    gx, gb = x.grad.clone(), m.bias.grad.clone()
    x.grad, m.bias.grad = None, None
    out = torch.compile(m, fullgraph=True, dynamic=True)(x)
    torch.testing.assert_close(out, eager)
    out.sum().backward()
    torch.testing.assert_close(x.grad, gx)
    torch.testing.assert_close(m.bias.grad, gb)


def test_torch_export():
    m = GgmlLinear()
    x = torch.randn(3, 512)
    ep = torch.export.export(m, (x,))
    assert any("qlora.ggml_matmul" in str(n.target) for n in ep.graph.nodes)
    torch.testing.assert_close(ep.module()(x), m(x))


@pytest.mark.parametrize("call, message", [
    (lambda b: qlora.ggml_dequantize(b, "IQ4_XS", [4, 256], torch.float32),
     'ggml_type "IQ4_XS" is not supported; expected one of F32, F16, BF16, Q4_0'),
    (lambda b: qlora.ggml_dequantize(b, "Q4_K", [4, 128], torch.float32),
     "in_features 128 is not a multiple of the Q4_K block size 256"),
    (lambda b: qlora.ggml_dequantize(b, "Q4_K", [5, 256], torch.float32),
     r"blocks holds 576 bytes but a Q4_K tensor of shape \[5, 256\] needs 720"),
    (lambda b: qlora.ggml_dequantize(b.float(), "Q4_K", [4, 256], torch.float32),
     "blocks must be uint8, got Float"),
    (lambda b: qlora.ggml_dequantize(b, "Q4_K", [4, 256], torch.int32),
     "dtype must be float32, float16 or bfloat16"),
    (lambda b: qlora.ggml_matmul(torch.randn(2, 255), b, "Q4_K", [4, 256]),
     r"x's last dimension \(255\) must equal in_features shape\[1\] = 256"),
    (lambda b: qlora.ggml_matmul(torch.randn(2, 256), b, "Q4_K", [4, 256], torch.randn(5)),
     "bias must have out_features = 4 elements"),
])
def test_bad_arguments_are_named(call, message):
    b = torch.from_numpy(random_blocks(Q.Q4_K, 4, 256, np.random.default_rng(7)))
    with pytest.raises(RuntimeError, match=message):
        call(b)


def test_empty_inputs_and_weights():
    blocks = torch.from_numpy(random_blocks(Q.Q4_0, 4, 64, np.random.default_rng(8)))
    assert qlora.ggml_matmul(torch.empty(0, 64), blocks, "Q4_0", [4, 64]).shape == (0, 4)
    assert qlora.ggml_matmul(torch.empty(2, 0, 64), blocks, "Q4_0", [4, 64]).shape == (2, 0, 4)
    none = torch.empty(0, 0, dtype=torch.uint8)
    assert qlora.ggml_matmul(torch.randn(3, 0), none, "Q4_0", [5, 0]).eq(0).all()
    assert qlora.ggml_dequantize(none, "Q6_K", [0, 256], torch.float32).shape == (0, 256)
