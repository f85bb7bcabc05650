"""Peak memory of the streaming paths, each in a child process on a model large enough to show
it (~0.9 GB of fp16 safetensors in two shards): loading + NF4 quantisation (`qlora quantize`)
and the merged GGUF export (`qlora export --format gguf`) must stay within what they keep plus
one tensor in flight (the bound the 7B pipeline needs on a 24 GiB machine), never the whole
checkpoint. The peak is the child's own ru_maxrss (RUSAGE_CHILDREN of a fresh interpreter).
"""
import json
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import save_file

from conftest import BUILD

QLORA = BUILD / "tools" / "qlora"
GiB = 1 << 30
# A LLaMA of ~440 M parameters: the largest tensors (embeddings, head) are 64 M values.
SHAPE = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=6,
             num_attention_heads=16, num_key_value_heads=16)

MEASURE = """
import resource, subprocess, sys
p = subprocess.run(sys.argv[1:], capture_output=True, text=True)
sys.stderr.write(p.stderr[-3000:])
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)
sys.exit(p.returncode)
"""


def peak_rss(*cmd):
    p = subprocess.run([sys.executable, "-c", MEASURE, *map(str, cmd)], capture_output=True,
                       text=True, timeout=1200)
    assert p.returncode == 0, p.stderr
    return int(p.stdout.split()[-1])


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    d = tmp_path_factory.mktemp("big")
    c = SHAPE
    h, I, V, L = c["hidden_size"], c["intermediate_size"], c["vocab_size"], c["num_hidden_layers"]
    rng = np.random.default_rng(0)

    def w(*shape):
        return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float16)

    index, largest = {}, 0
    for shard, layers in enumerate([range(0, L // 2), range(L // 2, L)]):
        tensors = {}
        if shard == 0:
            tensors["model.embed_tokens.weight"] = w(V, h)
        for l in layers:
            p = f"model.layers.{l}."
            for name, shape in [("self_attn.q_proj", (h, h)), ("self_attn.k_proj", (h, h)),
                                ("self_attn.v_proj", (h, h)), ("self_attn.o_proj", (h, h)),
                                ("mlp.gate_proj", (I, h)), ("mlp.up_proj", (I, h)),
                                ("mlp.down_proj", (h, I))]:
                tensors[p + name + ".weight"] = w(*shape)
            tensors[p + "input_layernorm.weight"] = np.ones(h, np.float16)
            tensors[p + "post_attention_layernorm.weight"] = np.ones(h, np.float16)
        if shard == 1:
            tensors["model.norm.weight"] = np.ones(h, np.float16)
            tensors["lm_head.weight"] = w(V, h)
        name = f"model-{shard:05d}-of-00002.safetensors"
        save_file(tensors, str(d / name), metadata={"format": "pt"})
        index.update({k: name for k in tensors})
        largest = max(largest, *(t.size for t in tensors.values()))
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": index}))
    (d / "config.json").write_text(json.dumps({**c, "model_type": "llama", "tie_word_embeddings": False,
                                               "max_position_embeddings": 2048, "rms_norm_eps": 1e-5}))
    # A small byte-level BPE tokenizer for the export (ids far below the vocab size).
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["streaming tensors one at a time"] * 10, trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(d / "tokenizer.json"))
    linear = L * (4 * h * h + 3 * h * I)
    file_bytes = sum(f.stat().st_size for f in d.glob("*.safetensors"))
    return {"dir": d, "largest": largest, "linear": linear, "dense": 2 * V * h + (2 * L + 1) * h,
            "file_bytes": file_bytes}


def test_load_and_quantise_peak_is_the_quantised_model_plus_one_tensor(big, tmp_path):
    peak = peak_rss(QLORA, "quantize", "--model", big["dir"], "--out", tmp_path / "q")
    # What stays: NF4 Linears (~0.53 bytes per weight with double quantisation) and the dense
    # weights in float32; in flight: one tensor in float32.
    kept = big["linear"] * 0.53 + big["dense"] * 4
    bound = kept + big["largest"] * 4 + GiB
    print(f"qlora quantize: peak RSS {peak / GiB:.2f} GiB, bound {bound / GiB:.2f} GiB, "
          f"checkpoint {big['file_bytes'] / GiB:.2f} GiB")
    assert peak <= bound


def test_gguf_export_streams_one_tensor_at_a_time(big, tmp_path):
    """The model is held in NF4 (~0.7 GiB with its float32 embeddings) and exported merged in
    float32 (a 1.8 GiB file): a writer that kept every encoded tensor until the end would hold
    the whole file on top of the model."""
    out = tmp_path / "m.gguf"
    peak = peak_rss(QLORA, "export", "--model", big["dir"], "--format", "gguf", "--outtype", "f32",
                    "--out", out)
    kept = big["linear"] * 0.53 + big["dense"] * 4
    bound = kept + 3 * big["largest"] * 4 + GiB // 2
    print(f"qlora export f32: peak RSS {peak / GiB:.2f} GiB, bound {bound / GiB:.2f} GiB, "
          f"file {out.stat().st_size / GiB:.2f} GiB")
    assert out.stat().st_size > bound - kept  # the file alone would break the bound
    assert peak <= bound
