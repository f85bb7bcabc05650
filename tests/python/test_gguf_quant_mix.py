"""The K-quant export mixes against llama.cpp's own `llama-quantize`.

Two parts, both on a small torch-free harness (tests/tools/quant_mix_harness.cpp) built here:

* Our Q4_1 / Q5_0 / Q5_1 / Q8_0 block encoders (csrc/io/ggml_legacy_quants.cpp), which the mixes
  fall back to for rows that are not a multiple of 256, must write the bytes of ggml's reference
  quantizers (ggml_quantize_chunk without an importance matrix) and of gguf-py's
  gguf.quants.quantize, on ordinary and degenerate blocks.
* The per-tensor type choice (csrc/export/gguf_quant_mix.cpp): F32 LLaMA GGUFs with random
  weights are quantized by llama_model_quantize (llama-cpp-python's libllama, the code behind
  llama-quantize) to Q4_K_S ... Q6_K, and every tensor of its output must have the type our mix
  chooses and the very bytes our encoders give for the same floats; general.file_type too.

llama.cpp runs in separate interpreters that never import torch (llama.cpp has died with SIGILL
in a process that had libtorch loaded).
"""
import dataclasses
import subprocess

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

import ggml_oracle

QK = 32

LEGACY = {"q4_1": Q.Q4_1, "q5_0": Q.Q5_0, "q5_1": Q.Q5_1, "q8_0": Q.Q8_0}


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    return ggml_oracle.build_harness(tmp_path_factory, "quant_mix_harness",
                                     ["io/ggml_kquants.cpp", "io/ggml_legacy_quants.cpp",
                                      "export/gguf_quant_mix.cpp"])


# ---- the legacy block encoders ---------------------------------------------------------------

def make_legacy_cases():
    """name -> float32 array (rows, n_per_row), n_per_row a multiple of 32."""
    rng = np.random.default_rng(20240611)
    c = ggml_oracle.regular_cases(rng, QK, n=8, per_row=8, wide_rows=16, wide_per_row=2,
                                  zero_at=2)
    c.update(ggml_oracle.degenerate_cases(QK, constants=(0.7, -1.3, 1e-3, -5e4, 1.0, 2.0 ** -10,
                                                         6e4, -7e4), float_ramp=True))
    c["mixed_zeros"] = np.where(rng.random((4, QK)) < 0.5, 0.0, -0.0).astype(np.float32)
    one = np.zeros((3, QK), np.float32)
    one[0, 5] = 1.0  # a single non-zero element
    one[1, 31] = -2.5
    one[2, 16] = 1e-3
    c["single_nonzero"] = one

    # The element of largest magnitude decides Q5_0's sign; on a tie ggml keeps the first.
    tie = ggml_oracle.gaussian_blocks(rng, 4, QK) * 0.1
    tie[0, 3], tie[0, 20] = 2.0, -2.0
    tie[1, 3], tie[1, 20] = -2.0, 2.0
    tie[2, 0], tie[2, 31] = 1.5, -1.5
    tie[3, 10], tie[3, 11] = -1.5, 1.5
    c["amax_tie"] = tie.astype(np.float32)

    # Scales that go subnormal as halves, then as floats (1 / d overflows to infinity).
    c.update(ggml_oracle.scaled_cases(rng, "tiny", (-4, -6, -8, -12, -20, -30, -38, -40, -43, -45),
                                      4, QK))
    # Halves that overflow; then max - min overflowing a float.
    c.update(ggml_oracle.scaled_cases(rng, "huge", (3, 4, 5, 6, 8, 12, 20, 30, 36, 37, 38), 4, QK))
    # Values on a grid put x / d + 0.5 on exact halves, where truncation and rounding differ.
    c.update(ggml_oracle.spread_cases(rng, QK, outlier_cols=(17, 2, 5, 30), n_signed=4,
                                      n_offset=4, uniform_per_row=2, tie_rows=8))
    c["ties_0_to_15"] = rng.integers(0, 16, (8, QK)).astype(np.float32)
    c["ties_0_to_31"] = rng.integers(0, 32, (8, QK)).astype(np.float32)
    c["sparse"] = ggml_oracle.sparse_blocks(rng, 8, QK, 0.1)
    # Integer grids whose extremes make d exactly 2 for one type, so odd values land exactly
    # half-way between two levels: truncation of x / d + 0.5, and roundf, decide them.
    for name, lo, hi in (("q4_1", 0, 30), ("q5_1", 0, 62), ("q5_0", -32, 31),
                         ("q8_0", -254, 254)):
        g = rng.integers(lo, hi + 1, (8, QK))
        g[:, 3] = lo if name == "q5_0" else hi  # the largest magnitude, once per block
        if name != "q5_0":
            g[:, 7] = lo if name != "q8_0" else -hi
        c[f"grid_d2_{name}"] = g.astype(np.float32)

    c["fuzz"] = ggml_oracle.fuzz_blocks(rng, 512, QK).reshape(64, 256)
    return c


LEGACY_CASES = make_legacy_cases()

# Offsets of the half-precision fields (d, and m where the type has one) in each block.
HALF_FIELDS = {"q4_1": (0, 2), "q5_0": (0,), "q5_1": (0, 2), "q8_0": (0,)}


def zero_sign_cleared(kind, data):
    """The blocks with -0.0 halves made +0.0. On all-zero blocks of mixed or negative zeros ggml
    and gguf-py pick different signed zeros for d and m (ggml keeps its +0.0 starting values,
    numpy's min/argmax pick a -0.0 element); the value and the decoding are the same."""
    size = gguf.GGML_QUANT_SIZES[LEGACY[kind]][1]
    b = data.reshape(-1, size).copy()
    for off in HALF_FIELDS[kind]:
        h = b[:, off:off + 2].copy().view(np.uint16)
        h[h == 0x8000] = 0
        b[:, off:off + 2] = h.view(np.uint8)
    return b.reshape(-1)


@pytest.fixture(scope="module")
def legacy_oracle(tmp_path_factory):
    return ggml_oracle.ggml_quantize(tmp_path_factory.mktemp("legacy_oracle"), LEGACY,
                                     LEGACY_CASES)


def encode(exe, kind, x, tmp_path):
    inp, out = tmp_path / f"{kind}.f32", tmp_path / f"{kind}.bin"
    np.ascontiguousarray(x, dtype=np.float32).tofile(inp)
    p = subprocess.run([str(exe), "encode", kind, str(inp), str(out)], capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    return np.fromfile(out, dtype=np.uint8)


def describe_mismatch(kind, ours, ref, x):
    return ggml_oracle.describe_mismatch(ours, ref, gguf.GGML_QUANT_SIZES[LEGACY[kind]][1],
                                         lambda blk: f"block {x.reshape(-1, QK)[blk].tolist()}")


@pytest.mark.parametrize("kind", list(LEGACY))
@pytest.mark.parametrize("case", list(LEGACY_CASES))
def test_legacy_bytes_match_ggml(harness, legacy_oracle, tmp_path, kind, case):
    x = LEGACY_CASES[case]
    ours = encode(harness, kind, x, tmp_path)
    ref = legacy_oracle[f"{kind}/{case}"]
    assert ours.size == ref.size
    if not np.array_equal(ours, ref):
        pytest.fail(describe_mismatch(kind, ours, ref, x))


@pytest.mark.parametrize("kind", list(LEGACY))
@pytest.mark.parametrize("case", list(LEGACY_CASES))
def test_legacy_bytes_match_gguf_py(harness, tmp_path, kind, case):
    x = LEGACY_CASES[case]
    ours = zero_sign_cleared(kind, encode(harness, kind, x, tmp_path))
    with np.errstate(all="ignore"):  # half overflow, inf * 0 in the huge cases
        ref = zero_sign_cleared(kind, gguf.quants.quantize(x, LEGACY[kind]).reshape(-1))
    if not np.array_equal(ours, ref):
        pytest.fail(describe_mismatch(kind, ours, ref, x))


@pytest.mark.parametrize("kind", list(LEGACY))
def test_legacy_round_trip(harness, tmp_path, kind):
    """Decoded by gguf-py, ordinary blocks come back within half a step of the type's grid (a
    whole step for Q5_0, whose grid ends one step short of -max)."""
    x = LEGACY_CASES["normal_256"]
    ours = encode(harness, kind, x, tmp_path)
    y = gguf.quants.dequantize(ours.reshape(x.shape[0], -1), LEGACY[kind]).reshape(-1, QK)
    xb = x.reshape(-1, QK).astype(np.float64)
    if kind in ("q4_1", "q5_1"):
        span = xb.max(1) - xb.min(1)
        step = span / {"q4_1": 15, "q5_1": 31}[kind]
    else:
        span = np.abs(xb).max(1)
        step = span / {"q5_0": 16, "q8_0": 127}[kind]
    bound = step * (1.0 if kind == "q5_0" else 0.5) * 1.01 + 2e-3 * span  # halves' rounding
    assert np.all(np.abs(y - xb).max(1) <= bound)


# ---- the type mix against llama_model_quantize ---------------------------------------------

# Runs in a fresh interpreter: quantizes one F32 GGUF with llama.cpp to each requested mix,
# printing "MIX rc" per job (rc != 0: llama.cpp refused). Without an importance matrix, as our
# export quantizes.
MIX_ORACLE = r"""
import sys
import llama_cpp
inp = sys.argv[1]
for job in sys.argv[2:]:
    mix, out = job.split("=", 1)
    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = getattr(llama_cpp, "LLAMA_FTYPE_MOSTLY_" + mix)
    p.nthread = 2
    rc = llama_cpp.llama_model_quantize(inp.encode(), out.encode(), p)
    print(mix, rc, flush=True)
"""

MIXES = ["Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K"]


@dataclasses.dataclass(frozen=True)
class Model:
    hidden: int
    n_layer: int
    n_head: int
    n_head_kv: int
    n_ff: int
    vocab: int
    output: bool  # an output.weight; without one token_embd is tied to the output
    rope_freqs: bool = False
    mixes: tuple = tuple(MIXES)


MODELS = {
    # Grouped-query attention (4 query heads per KV head), every row a multiple of 256, and a
    # llama3-style rope_freqs (1-D, never quantized).
    "gqa4": Model(256, 8, 4, 1, 512, 48, output=True, rope_freqs=True),
    # Tied embeddings; ffn_down rows of 320 take the 32-element fallbacks (Q5_0, Q5_1, Q8_0);
    # 12 layers put the every-third-layer rule off the eighths.
    "gqa2_tied_ff320": Model(256, 12, 8, 4, 320, 40, output=False),
    # No row a multiple of 256: fallbacks everywhere, output to Q8_0, and ffn_down rows of 80
    # (not even a multiple of 32) to F16.
    "narrow": Model(96, 8, 4, 2, 80, 40, output=True),
    # Narrow and tied (token_embd takes the output's Q8_0), plain multi-head attention, and a
    # layer count whose eighth rounds to 0.
    "narrow_tied": Model(96, 5, 2, 2, 160, 40, output=False),
    # Rows of 80, not even a multiple of 32, in every tensor but ffn_down (128): F16 through the
    # K-quant fallback chain and, for the output, straight from Q8_0.
    "rows80": Model(80, 4, 2, 2, 128, 16, output=True),
    # 80 layers with grouped-query attention is what llama.cpp calls a 70B, where attn_v gets
    # Q5_K instead of Q4_K.
    "llama70b": Model(256, 80, 4, 1, 32, 16, output=True, mixes=("Q4_K_S", "Q4_K_M")),
}


def model_tensors(m, seed):
    """[(name, float32 array)] of a LLaMA model, in the order our exporter writes them."""
    rng = np.random.default_rng(seed)
    head = m.hidden // m.n_head

    def w(*shape):
        return (rng.standard_normal(shape) * 0.05).astype(np.float32)

    out = []
    if m.rope_freqs:
        out.append(("rope_freqs.weight", (1.0 + rng.random(head // 2)).astype(np.float32)))
    out.append(("token_embd.weight", w(m.vocab, m.hidden)))
    for i in range(m.n_layer):
        p = f"blk.{i}."
        out += [(p + "attn_norm.weight", 1.0 + w(m.hidden)),
                (p + "attn_q.weight", w(m.n_head * head, m.hidden)),
                (p + "attn_k.weight", w(m.n_head_kv * head, m.hidden)),
                (p + "attn_v.weight", w(m.n_head_kv * head, m.hidden)),
                (p + "attn_output.weight", w(m.hidden, m.n_head * head)),
                (p + "ffn_norm.weight", 1.0 + w(m.hidden)),
                (p + "ffn_gate.weight", w(m.n_ff, m.hidden)),
                (p + "ffn_up.weight", w(m.n_ff, m.hidden)),
                (p + "ffn_down.weight", w(m.hidden, m.n_ff))]
    out.append(("output_norm.weight", 1.0 + w(m.hidden)))
    if m.output:
        out.append(("output.weight", w(m.vocab, m.hidden)))
    return out


def write_f32_gguf(path, m, tensors):
    # No tokenizer: llama_model_quantize reads the hyper-parameters and tensors only.
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(256)
    w.add_embedding_length(m.hidden)
    w.add_block_count(m.n_layer)
    w.add_feed_forward_length(m.n_ff)
    w.add_head_count(m.n_head)
    w.add_head_count_kv(m.n_head_kv)
    w.add_rope_dimension_count(m.hidden // m.n_head)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(0)  # ALL_F32
    for name, data in tensors:
        w.add_tensor(name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def run_mix_oracle(src, outs):
    """{mix: rc} from llama_model_quantize; outs maps mix -> output path."""
    jobs = [f"{mix}={path}" for mix, path in outs.items()]
    p = ggml_oracle.run_isolated(MIX_ORACLE, src, *jobs, what="llama.cpp quantize died")
    rcs = dict(line.split() for line in p.stdout.splitlines())
    return {mix: int(rc) for mix, rc in rcs.items()}, p.stderr


def run_our_mix(exe, m, tensors, mix, tmp):
    """{name: (ggml type, bytes)} from the harness's mix, walking the tensors in our exporter's
    order (llama.cpp walks them sorted by layer, then name)."""
    manifest, data = tmp / f"manifest_{mix}.txt", tmp / "data.f32"
    lines = [f"{m.n_layer} {m.n_head} {m.n_head_kv}"]
    lines += [f"{name} {a.ndim} {a.shape[-1]} {a.size}" for name, a in tensors]
    manifest.write_text("\n".join(lines) + "\n")
    if not data.exists():
        np.concatenate([a.reshape(-1) for _, a in tensors]).tofile(data)
    types, blob = tmp / f"types_{mix}.txt", tmp / f"ours_{mix}.bin"
    p = subprocess.run([str(exe), "mix", mix, str(manifest), str(data), str(types), str(blob)],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    raw = blob.read_bytes()
    res = {}
    for line in types.read_text().splitlines():
        name, code, at, size = line.split()
        res[name] = (int(code), raw[int(at):int(at) + int(size)])
    return res


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    """model name -> (Model, tensors, tmp dir, {mix: llama.cpp output}, {mix: rc}, its log),
    built on first use."""
    ggml_oracle.needs_llama_cpp()
    cache = {}

    def get(key):
        if key not in cache:
            m = MODELS[key]
            tmp = tmp_path_factory.mktemp(f"mix_{key}")
            tensors = model_tensors(m, seed=list(MODELS).index(key) + 1)
            src = tmp / "model-f32.gguf"
            write_f32_gguf(src, m, tensors)
            outs = {mix: tmp / f"model-{mix}.gguf" for mix in m.mixes}
            rcs, log = run_mix_oracle(src, outs)
            cache[key] = (m, tensors, tmp, outs, rcs, log)
        return cache[key]

    return get


def read_gguf(path):
    r = gguf.GGUFReader(str(path))
    tensors = {t.name: (int(t.tensor_type), t.data.tobytes()) for t in r.tensors}
    return tensors, int(r.fields["general.file_type"].contents())


CASES = [(name, mix) for name, m in MODELS.items() for mix in m.mixes]


@pytest.mark.parametrize("model,mix", CASES, ids=[f"{a}-{b}" for a, b in CASES])
def test_mix_matches_llama_quantize(harness, quantized, model, mix):
    m, tensors, tmp, outs, rcs, log = quantized(model)
    assert rcs[mix] == 0, f"llama_model_quantize failed for {mix}:\n{log[-3000:]}"
    theirs, file_type = read_gguf(outs[mix])
    ours = run_our_mix(harness, m, tensors, mix, tmp)

    assert sorted(ours) == sorted(theirs)
    names = {code: Q(code).name for code, _ in list(ours.values()) + list(theirs.values())}
    wrong = [f"{n}: ours {names[ours[n][0]]}, llama.cpp {names[theirs[n][0]]}"
             for n in ours if ours[n][0] != theirs[n][0]]
    assert not wrong, "types differ:\n" + "\n".join(wrong)
    differ = [n for n in ours if ours[n][1] != theirs[n][1]]
    assert not differ, (f"{len(differ)} tensors' bytes differ, e.g. "
                        f"{[(n, names[ours[n][0]]) for n in differ[:6]]}")

    p = subprocess.run([str(harness), "parse", mix], capture_output=True, text=True)
    assert p.returncode == 0
    assert p.stdout.split() == [mix, str(file_type)]


def test_mixes_cover_every_fallback(quantized):
    """The models above reach every type the mixes can produce, so the comparison covers the
    whole fallback chain (Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, then F16)."""
    seen = set()
    for name, m in MODELS.items():
        _, _, _, outs, rcs, log = quantized(name)
        for mix in m.mixes:
            assert rcs[mix] == 0, log[-3000:]
            seen |= {code for code, _ in read_gguf(outs[mix])[0].values()}
    assert {Q(c) for c in seen} == {Q.F32, Q.F16, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q4_K, Q.Q5_K,
                                    Q.Q6_K}


@pytest.mark.parametrize("name,expected", [
    ("q4_k_s", "Q4_K_S 14"), ("Q4_K_M", "Q4_K_M 15"), ("q4_k", "Q4_K_M 15"),
    ("q5_k_s", "Q5_K_S 16"), ("q5_k_m", "Q5_K_M 17"), ("Q5_K", "Q5_K_M 17"),
    ("q6_k", "Q6_K 18"), ("q6_k_m", None), ("q8_0", None), ("q4_k_l", None), ("", None)])
def test_outtype_names(harness, name, expected):
    """llama-quantize's names, with its aliases Q4_K = Q4_K_M and Q5_K = Q5_K_M."""
    p = subprocess.run([str(harness), "parse", name], capture_output=True, text=True)
    if expected is None:
        assert p.returncode == 1
    else:
        assert p.returncode == 0 and p.stdout.strip() == expected


def test_mix_refuses_expert_tensors(harness, tmp_path):
    """MoE models follow rules keyed on the expert count, which the mix does not implement: a
    3-D expert tensor is refused rather than given a dense model's type. The router is 2-D and
    kept as it is, as llama-quantize keeps it."""
    tensors = [("blk.0.ffn_gate_inp.weight", np.zeros((8, 256), np.float32)),
               ("blk.0.ffn_up_exps.weight", np.zeros((8, 64, 256), np.float32))]
    manifest, data = tmp_path / "manifest.txt", tmp_path / "data.f32"
    manifest.write_text("1 4 4\n" + "".join(f"{n} {a.ndim} {a.shape[-1]} {a.size}\n"
                                            for n, a in tensors))
    np.concatenate([a.reshape(-1) for _, a in tensors]).tofile(data)
    out = [str(tmp_path / "types.txt"), str(tmp_path / "out.bin")]
    p = subprocess.run([str(harness), "mix", "q4_k_m", str(manifest), str(data), *out],
                       capture_output=True, text=True)
    assert p.returncode == 3 and "ffn_up_exps" in p.stderr, p.stderr
    manifest.write_text("1 4 4\n" + "".join(f"{n} {a.ndim} {a.shape[-1]} {a.size}\n"
                                            for n, a in tensors[:1]))
    p = subprocess.run([str(harness), "mix", "q4_k_m", str(manifest), str(data), *out],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "types.txt").read_text().split()[:2] == ["blk.0.ffn_gate_inp.weight",
                                                                str(int(Q.F32))]
