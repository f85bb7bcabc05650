"""torch.ops.qlora.* as PyTorch sees them: opcheck (schema, autograd
registration, fake tensors, AOT dispatch), torch.compile(fullgraph=True),
torch.export, gradcheck, and schema parity with torch.ops.bitsandbytes."""
import os
import subprocess
import sys

import pytest
import torch
from torch.library import opcheck

import bitsandbytes  # noqa: F401  (registers torch.ops.bitsandbytes for the parity test)

import conftest  # noqa: F401  (loads libqlora)

qlora = torch.ops.qlora

LEVELS = ["portable", "avx2", "avx512", "avx512_bf16"]
REQUIRED = os.environ.get("QLORA_REQUIRE_CPU_CAPABILITY")
if REQUIRED and LEVELS.index(qlora.cpu_capability()) < LEVELS.index(REQUIRED):
    pytest.skip(f"this CPU's level is {qlora.cpu_capability()}, below {REQUIRED}",
                allow_module_level=True)


def weight(out_f=48, in_f=128, blocksize=64, quant_type="nf4"):
    w = torch.randn(out_f, in_f) * 0.05
    packed, absmax = qlora.quantize_4bit(w, blocksize, quant_type, torch.uint8)
    return packed, absmax, [out_f, in_f]


def qlora_dynamic_map(signed=True):
    from bitsandbytes.functional import create_dynamic_map
    return create_dynamic_map(signed=signed)


def nested_weight(out_f=48, in_f=128, blocksize=64):
    """A 4-bit weight with double-quantised statistics, as gemm_4bit takes them."""
    w = torch.randn(out_f, in_f) * 0.05
    packed, absmax = qlora.quantize_4bit(w, blocksize, "nf4", torch.uint8)
    offset = absmax.mean()
    q8, nested_absmax = qlora.quantize_blockwise(absmax - offset, qlora_dynamic_map(), 256)
    return packed, q8, nested_absmax, offset.reshape(())


def sample_calls():
    torch.manual_seed(0)
    code8 = torch.linspace(-1, 1, 256)
    x = torch.randn(3, 200)
    for dtype in [torch.float32, torch.bfloat16, torch.float16]:
        xd = x.to(dtype)
        yield qlora.quantize_4bit.default, (xd, 64, "nf4", torch.uint8)
        yield qlora.quantize_4bit.default, (xd, 32, "fp4", torch.float32)
        packed, absmax = qlora.quantize_4bit(xd, 64, "nf4", torch.uint8)
        yield qlora.dequantize_4bit.default, (packed, absmax, 64, "nf4", [3, 200], dtype)
        yield qlora.dequantize_4bit.out, (packed, absmax, 64, "nf4", [3, 200], dtype, torch.empty(3, 200, dtype=dtype))
        yield qlora.quantize_blockwise.default, (xd, code8, 256)
        q, a = qlora.quantize_blockwise(xd, code8, 256)
        yield qlora.dequantize_blockwise.default, (q, a, code8, 256, dtype)
        p, am, shape = weight()
        code4 = torch.tensor([-1.0] + [0.0] * 14 + [1.0])
        yield qlora.gemv_4bit.default, (torch.randn(1, 128).to(dtype), p, shape, am, code4, 64)
        for rows in [(1, 128), (5, 128), (2, 3, 128)]:
            xr = torch.randn(*rows).to(dtype).requires_grad_()
            bias = torch.randn(48).to(dtype).requires_grad_()
            yield qlora.matmul_4bit.default, (xr, p, am, 64, "nf4", shape, bias)
            yield qlora.matmul_4bit.default, (xr, p, am, 64, "nf4", shape, None)
        yield qlora.hash_dropout.default, (xd.clone().requires_grad_(), 0.25, 1234)
        yield qlora.dequantize_blockwise.out, (q, a, code8, 256, dtype, torch.empty(3, 200, dtype=dtype))
        a1 = torch.randn(1, 128).to(dtype)
        yield qlora.gemv_4bit.out, (a1, p, shape, am, code4, 64, torch.empty(1, 48, dtype=dtype))
        nested = nested_weight()
        for rows in [(1, 128), (4, 128)]:
            xr = torch.randn(*rows).to(dtype).requires_grad_()
            bias = torch.randn(48).to(dtype).requires_grad_()
            yield qlora.gemm_4bit.default, (xr, nested[0], shape, nested[2], 64, "nf4", bias,
                                            nested[1], qlora_dynamic_map(), nested[3])
            yield qlora.gemm_4bit.default, (xr, p, shape, am, 64, "nf4", None)
        n = 700
        pd = torch.randn(n).to(dtype)
        yield qlora.optimizer_update_32bit.default, (
            "adam", torch.randn(n).to(dtype), pd.clone(), torch.zeros(n), torch.zeros(n), None,
            0.0, 0.0, 0.9, 0.999, 0.0, 0.0, 1e-8, 0.01, 1, 1e-3, 1.0)
        yield qlora.optimizer_update_8bit_blockwise.default, (
            "adam", torch.randn(n).to(dtype), pd.clone(), torch.zeros(n, dtype=torch.uint8),
            torch.zeros(n, dtype=torch.uint8), 0.9, 0.999, 0.0, 0.0, 1e-8, 1, 1e-3,
            qlora_dynamic_map(), qlora_dynamic_map(False), torch.zeros(3), torch.zeros(3), 0.01, 1.0)


@pytest.mark.parametrize("call", list(sample_calls()), ids=lambda c: str(c[0]))
def test_opcheck(call):
    op, args = call
    opcheck(op, args)


def test_opcheck_covers_every_op():
    """Every op with a Meta kernel (all but cpu_capability, which traces nothing) is
    opchecked here or in test_ggml_ops.py: a new op fails this test until it is."""
    import test_ggml_ops
    covered = {str(op) for op, _ in sample_calls()} | {str(op) for op, _ in test_ggml_ops.sample_calls()}
    registered = {name.replace("::", ".") + ("" if "." in name else ".default")
                  for name in torch._C._dispatch_get_registrations_for_dispatch_key("Meta")
                  if name.startswith("qlora::")}
    assert covered == registered


class QLinear(torch.nn.Module):
    def __init__(self, out_f=64, in_f=256):
        super().__init__()
        p, a, shape = weight(out_f, in_f)
        self.register_buffer("packed", p)
        self.register_buffer("absmax", a)
        self.shape = shape
        self.bias = torch.nn.Parameter(torch.randn(out_f))

    def forward(self, x):
        return torch.relu(qlora.matmul_4bit(x, self.packed, self.absmax, 64, "nf4", self.shape, self.bias))


def test_torch_compile_fullgraph_matches_eager_forward_and_backward():
    torch.manual_seed(1)
    m = QLinear()
    x = torch.randn(4, 7, 256, requires_grad=True)
    eager = m(x)
    eager.sum().backward()
    gx, gb = x.grad.clone(), m.bias.grad.clone()
    x.grad, m.bias.grad = None, None
    compiled = torch.compile(m, fullgraph=True)
    out = compiled(x)
    torch.testing.assert_close(out, eager)
    out.sum().backward()
    torch.testing.assert_close(x.grad, gx)
    torch.testing.assert_close(m.bias.grad, gb)


def test_torch_compile_dynamic_shapes():
    m = QLinear()
    compiled = torch.compile(m, fullgraph=True, dynamic=True)
    for rows in [2, 5, 9]:
        x = torch.randn(rows, 256)
        torch.testing.assert_close(compiled(x), m(x))


def test_torch_export():
    m = QLinear()
    x = torch.randn(3, 256)
    ep = torch.export.export(m, (x,))
    assert any("qlora.matmul_4bit" in str(n.target) for n in ep.graph.nodes)
    torch.testing.assert_close(ep.module()(x), m(x))


def test_gradcheck_wrt_input_and_bias():
    torch.manual_seed(2)
    p, a, shape = weight(8, 64)
    x = torch.randn(3, 64, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, b: qlora.matmul_4bit(x, p, a, 64, "nf4", shape, b), (x, bias))
    assert torch.autograd.gradgradcheck(lambda x, b: qlora.matmul_4bit(x, p, a, 64, "nf4", shape, b),
                                        (x, bias))


def test_hash_dropout_gradcheck_and_mask_shared_by_dtypes():
    x = torch.randn(5, 37, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: qlora.hash_dropout(x, 0.3, 77), (x,))
    assert torch.autograd.gradgradcheck(lambda x: qlora.hash_dropout(x, 0.3, 77), (x,))
    y = qlora.hash_dropout(x.detach(), 0.3, 77)
    dropped = y == 0
    assert 0.2 < dropped.double().mean() < 0.4
    torch.testing.assert_close(y[~dropped], x.detach()[~dropped] / 0.7)
    for dtype in [torch.float32, torch.bfloat16, torch.float16]:
        assert torch.equal(qlora.hash_dropout(x.detach().to(dtype), 0.3, 77) == 0, dropped), dtype
    assert not torch.equal(qlora.hash_dropout(x.detach(), 0.3, 78) == 0, dropped)


def test_hash_dropout_under_torch_compile():
    x = torch.randn(4, 64, requires_grad=True)
    f = lambda x: torch.relu(qlora.hash_dropout(x, 0.5, 9)).sum()  # noqa: E731
    f(x).backward()
    g = x.grad.clone()
    x.grad = None
    torch.compile(f, fullgraph=True)(x).backward()
    torch.testing.assert_close(x.grad, g)


def test_weight_gets_no_gradient():
    p, a, shape = weight()
    a = a.clone().requires_grad_()
    x = torch.randn(2, 128, requires_grad=True)
    qlora.matmul_4bit(x, p, a.detach(), 64, "nf4", shape, None).sum().backward()
    assert x.grad is not None and a.grad is None


@pytest.mark.parametrize("name", ["quantize_4bit", "dequantize_4bit", "quantize_blockwise",
                                  "dequantize_blockwise", "gemv_4bit"])
def test_schema_mirrors_bitsandbytes(name):
    ours = getattr(qlora, name).default._schema
    theirs = getattr(torch.ops.bitsandbytes, name).default._schema
    norm = lambda t: str(t).replace("SymInt[]", "int[]")  # noqa: E731
    assert [(a.name, norm(a.type)) for a in ours.arguments] == [(a.name, norm(a.type)) for a in theirs.arguments]
    assert [norm(r.type) for r in ours.returns] == [norm(r.type) for r in theirs.returns]


def test_cpu_capability_op():
    level = qlora.cpu_capability()
    assert level in LEVELS
    if REQUIRED:
        assert level == REQUIRED  # the environment's cap is what the kernels use
    try:
        assert qlora.cpu_capability("portable") == "portable"
        w = torch.randn(8, 64)
        p, a = qlora.quantize_4bit(w, 64, "nf4", torch.uint8)
        y = qlora.dequantize_4bit(p, a, 64, "nf4", [8, 64], torch.bfloat16)
    finally:
        assert qlora.cpu_capability(level) == level
    assert torch.equal(y, qlora.dequantize_4bit(p, a, 64, "nf4", [8, 64], torch.bfloat16))
    with pytest.raises(RuntimeError, match="expected one of portable, avx2, avx512, avx512_bf16"):
        qlora.cpu_capability("sse9")


def test_bad_capability_variable_is_a_clear_error():
    code = ("import torch; torch.ops.load_library(%r); "
            "torch.ops.qlora.quantize_4bit(torch.ones(64), 64, 'nf4', torch.uint8)") % conftest.LIBRARY
    env = dict(os.environ, QLORA_CPU_CAPABILITY="avx9000")
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode != 0
    assert "QLORA_CPU_CAPABILITY='avx9000' is not a CPU capability level" in p.stderr
