"""Every torch.ops.qlora op on CUDA tensors (ctest label cuda; skipped without a GPU):
torch.library.opcheck (schema, fake tensors, autograd registration, AOT dispatch) and the
CUDA result against the CPU kernel's. Needs neither bitsandbytes nor gguf (the GPU
machines have neither)."""
import pytest
import torch
from torch.library import opcheck

import conftest  # noqa: F401  (loads libqlora_ops)

if not torch.cuda.is_available():
    pytest.skip("no CUDA device", allow_module_level=True)

qlora = torch.ops.qlora
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def code8():
    # Any sorted 256-entry code serves opcheck; the dynamic maps are exercised in the gtests.
    return torch.linspace(-1, 1, 256)


def q8_0_blocks(rows, cols):
    """Random Q8_0 blocks (fp16 scale, 32 int8) with finite, moderate scales."""
    n = rows * cols // 32
    scale = (torch.rand(n) * 0.01 + 0.001).to(torch.float16).view(torch.uint8).view(n, 2)
    quants = torch.randint(-127, 128, (n, 32), dtype=torch.int8).view(torch.uint8)
    return torch.cat([scale, quants], 1).reshape(-1)


def nested(w, blocksize=64):
    packed, absmax = qlora.quantize_4bit(w, blocksize, "nf4", torch.uint8)
    offset = absmax.mean()
    q8, nested_absmax = qlora.quantize_blockwise(absmax - offset, code8().to(w.device), 256)
    return packed, absmax, q8, nested_absmax, offset.reshape(())


def sample_calls(device="cuda"):
    torch.manual_seed(0)
    c8 = code8().to(device)
    x = torch.randn(3, 200, device=device)
    w = torch.randn(48, 128, device=device) * 0.05
    packed, absmax, q8, nabs, offset = nested(w)
    code4 = torch.tensor([-1.0] + [0.0] * 14 + [1.0], device=device)
    for dtype in DTYPES:
        xd = x.to(dtype)
        yield qlora.quantize_4bit.default, (xd, 64, "nf4", torch.uint8)
        yield qlora.quantize_4bit.default, (xd, 32, "fp4", torch.float32)
        p4, a4 = qlora.quantize_4bit(xd, 64, "nf4", torch.uint8)
        yield qlora.dequantize_4bit.default, (p4, a4, 64, "nf4", [3, 200], dtype)
        yield qlora.dequantize_4bit.out, (p4, a4, 64, "nf4", [3, 200], dtype,
                                          torch.empty(3, 200, dtype=dtype, device=device))
        yield qlora.quantize_blockwise.default, (xd, c8, 256)
        q, a = qlora.quantize_blockwise(xd, c8, 256)
        yield qlora.dequantize_blockwise.default, (q, a, c8, 256, dtype)
        yield qlora.dequantize_blockwise.out, (q, a, c8, 256, dtype,
                                               torch.empty(3, 200, dtype=dtype, device=device))
        a1 = torch.randn(1, 128, device=device).to(dtype)
        yield qlora.gemv_4bit.default, (a1, packed, [48, 128], absmax, code4, 64)
        yield qlora.gemv_4bit.out, (a1, packed, [48, 128], absmax, code4, 64,
                                    torch.empty(1, 48, dtype=dtype, device=device))
        for rows in [(1, 128), (5, 128), (2, 3, 128)]:
            xr = torch.randn(*rows, device=device).to(dtype).requires_grad_()
            bias = torch.randn(48, device=device).to(dtype).requires_grad_()
            yield qlora.matmul_4bit.default, (xr, packed, absmax, 64, "nf4", [48, 128], bias)
            yield qlora.gemm_4bit.default, (xr, packed, [48, 128], nabs, 64, "nf4", bias, q8, c8,
                                            offset)
            yield qlora.gemm_4bit.default, (xr, packed, [48, 128], absmax, 64, "nf4", None)
        yield qlora.hash_dropout.default, (xd.clone().requires_grad_(), 0.25, 1234)
        blocks = q8_0_blocks(8, 512).to(device)
        yield qlora.ggml_dequantize.default, (blocks, "Q8_0", [8, 512], dtype)
        xg = torch.randn(2, 512, device=device).to(dtype).requires_grad_()
        yield qlora.ggml_matmul.default, (xg, blocks, "Q8_0", [8, 512], None)
        n = 700
        pd = torch.randn(n, device=device).to(dtype)
        yield qlora.optimizer_update_32bit.default, (
            "adam", torch.randn(n, device=device).to(dtype), pd.clone(),
            torch.zeros(n, device=device), torch.zeros(n, device=device), None, 0.0, 0.0, 0.9, 0.999,
            0.0, 0.0, 1e-8, 0.01, 1, 1e-3, 1.0)
        yield qlora.optimizer_update_8bit_blockwise.default, (
            "adam", torch.randn(n, device=device).to(dtype), pd.clone(),
            torch.zeros(n, dtype=torch.uint8, device=device),
            torch.zeros(n, dtype=torch.uint8, device=device), 0.9, 0.999, 0.0, 0.0, 1e-8, 1, 1e-3,
            c8, c8.abs().sort().values, torch.zeros(3, device=device), torch.zeros(3, device=device),
            0.01, 1.0)


@pytest.mark.parametrize("call", list(sample_calls()), ids=lambda c: str(c[0]))
def test_opcheck_on_cuda(call):
    op, args = call
    opcheck(op, args)


def test_every_op_is_checked_on_cuda():
    covered = {str(op) for op, _ in sample_calls()}
    registered = {name.replace("::", ".") + ("" if "." in name else ".default")
                  for name in torch._C._dispatch_get_registrations_for_dispatch_key("CUDA")
                  if name.startswith("qlora::")}
    assert registered <= covered, registered - covered


def _to_cpu(v):
    return v.detach().cpu() if isinstance(v, torch.Tensor) else v


@pytest.mark.parametrize("call", [c for c in sample_calls()
                                  if "optimizer" in str(c[0]) or "gemm" in str(c[0])
                                  or ".out" in str(c[0])], ids=lambda c: str(c[0]))
def test_cuda_equals_cpu(call):
    op, args = call
    cpu_args = [_to_cpu(a) for a in args]
    gpu_args = [a.detach().clone() if isinstance(a, torch.Tensor) else a for a in args]
    got, want = op(*gpu_args), op(*cpu_args)
    if got is None:  # in-place and .out ops: compare every argument they may write
        for g, w in zip(gpu_args, cpu_args):
            if not isinstance(g, torch.Tensor):
                continue
            if "gemv" in str(op):  # a dot product: the warp sums in another order
                torch.testing.assert_close(g.cpu().float(), w.float(), rtol=3e-2, atol=3e-2)
            else:  # the shared per-element math: the same bits
                assert torch.equal(g.cpu(), w), op
    else:
        tol = 1e-4 if got.dtype == torch.float32 else 3e-2
        torch.testing.assert_close(got.cpu().float(), want.float(), rtol=tol, atol=tol)
