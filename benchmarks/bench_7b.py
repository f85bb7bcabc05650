"""The 7B pipeline on this machine: a Llama-2-7B-shaped checkpoint with random fp16 weights
(sharded safetensors, ~13.5 GB, generated here into build/bench7b), then, each step in its own
process with its peak RSS and wall time, ours beside the reference in the same run:

  load     `qlora quantize` (load + NF4 double-quant + write a bitsandbytes folder)
           vs transformers `from_pretrained(quantization_config=BitsAndBytesConfig(load_in_4bit))`
  train    one QLoRA step (seq 256, r 16 on all linear layers, gradient checkpointing, paged
           8-bit AdamW, micro-batch 1) with `qlora train` vs transformers + PEFT + bitsandbytes
  export   `qlora export --format gguf --outtype q4_k_m` of the merged model, then llama.cpp
           loads the file and evaluates 8 tokens (its own process)
  plan     `qlora plan` of the training config, printed beside the measured peak

    .venv/bin/python benchmarks/bench_7b.py [--stages make,load,train,export] [--skip-reference]

Needs ~30 GB of disk in build/ and `make build` done. Record the table in RESULTS.md with the
CPU it names.
"""
import argparse
import json
import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
OUT = REPO / "build" / "bench7b"
QLORA = REPO / "build" / "tools" / "qlora"
PY = sys.executable
SEQ = 256

CONFIG = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=32000,
              hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
              num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
              rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
              bos_token_id=1, eos_token_id=2, torch_dtype="float16", hidden_act="silu")


def cpu_name():
    model, flags = "?", ""
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name") and model == "?":
            model = line.split(":", 1)[1].strip()
        if line.startswith("flags") and not flags:
            have = set(line.split(":", 1)[1].split())
            flags = " ".join(f for f in ["avx2", "fma", "avx512f", "avx512_bf16", "amx_tile"] if f in have)
    return f"{model} ({flags})"


# Runs a command as the only child of a fresh interpreter, so its peak RSS is its own.
MEASURE = """
import resource, subprocess, sys, time
t = time.time()
p = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
sys.stderr.write(p.stderr[-4000:])
print(time.time() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)
sys.exit(p.returncode)
"""


def timed(cmd):
    """(wall seconds, peak RSS bytes) of `cmd`, run alone in its own process tree."""
    p = subprocess.run([PY, "-c", MEASURE, *map(str, cmd)], capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, cmd))} failed ({p.returncode}):\n{p.stderr[-4000:]}")
    wall, peak = p.stdout.split()[-2:]
    return float(wall), int(peak)


def make_checkpoint():
    import numpy as np
    from safetensors.numpy import save_file

    model = OUT / "model"
    model.mkdir(parents=True, exist_ok=True)
    if (model / "model.safetensors.index.json").exists():
        return model
    c = CONFIG
    h, I, L, V = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
    rng = np.random.default_rng(0)

    def weight(*shape):
        return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float16)

    shards, index = [], {}
    def flush(tensors, i):
        name = f"model-{i:05d}.safetensors"
        save_file(tensors, str(model / name), metadata={"format": "pt"})
        for k in tensors:
            index[k] = name
        shards.append(name)

    flush({"model.embed_tokens.weight": weight(V, h)}, 0)
    for l in range(L):
        p = f"model.layers.{l}."
        flush({p + "self_attn.q_proj.weight": weight(h, h), p + "self_attn.k_proj.weight": weight(h, h),
               p + "self_attn.v_proj.weight": weight(h, h), p + "self_attn.o_proj.weight": weight(h, h),
               p + "mlp.gate_proj.weight": weight(I, h), p + "mlp.up_proj.weight": weight(I, h),
               p + "mlp.down_proj.weight": weight(h, I),
               p + "input_layernorm.weight": np.ones(h, np.float16),
               p + "post_attention_layernorm.weight": np.ones(h, np.float16)}, l + 1)
    flush({"model.norm.weight": np.ones(h, np.float16), "lm_head.weight": weight(V, h)}, L + 1)
    (model / "config.json").write_text(json.dumps(c, indent=2))
    (model / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))
    # A byte-level BPE tokenizer trained on this repository's licence text (ids < 32000).
    from tokenizers import Tokenizer, decoders, models as tm, pre_tokenizers, trainers
    tok = Tokenizer(tm.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = (REPO / "LICENSE-APACHE").read_text().split("\n")
    tok.train_from_iterator(text * 4, trainers.BpeTrainer(
        vocab_size=2000, special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(model / "tokenizer.json"))
    (model / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    # Text documents: blank-line separated paragraphs.
    (OUT / "train.txt").write_text((REPO / "LICENSE-APACHE").read_text() * 4)
    return model


def train_config(model):
    cfg = {
        "model": {"path": str(model), "quantize": True, "double_quant": True},
        "lora": {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": ["all-linear"]},
        "data": {"train": str(OUT / "train.txt"), "template": "plain",
                 "max_length": SEQ, "packing": True},
        "training": {"max_steps": 1, "micro_batch_size": 1, "gradient_accumulation_steps": 1,
                     "optimizer": "paged_adamw_8bit", "gradient_checkpointing": True,
                     "selective_recompute": False, "eval_every": 0, "save_every": 0,
                     "threads": 2},
        "generation": {"prompts": []},
        "output_dir": str(OUT / "run"),
        "resume": "none",
    }
    path = OUT / "train.yaml"
    path.write_text(json.dumps(cfg))
    return path


REFERENCE_LOAD = """
import resource, sys, time, torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig
t = time.time()
m = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32, device_map="cpu",
    quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32))
print(time.time() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""

REFERENCE_TRAIN = """
import resource, sys, time, torch
import bitsandbytes as bnb
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from transformers import AutoModelForCausalLM, BitsAndBytesConfig
m = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32, device_map="cpu",
    quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32))
m = prepare_model_for_kbit_training(m, use_gradient_checkpointing=True)
m = get_peft_model(m, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear"))
m.train()  # from_pretrained leaves eval mode, where transformers skips gradient checkpointing
opt = bnb.optim.PagedAdamW8bit([p for p in m.parameters() if p.requires_grad], lr=2e-4)
ids = torch.randint(0, 2000, (1, int(sys.argv[2])))
t = time.time()
loss = m(input_ids=ids, labels=ids).loss
loss.backward(); opt.step(); opt.zero_grad()
print(time.time() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""

LLAMA_CPP_EVAL = """
import sys, time, llama_cpp
t = time.time()
llm = llama_cpp.Llama(model_path=sys.argv[1], n_ctx=64, n_threads=2, verbose=False)
llm.eval(list(range(1, 9)))
print(time.time() - t, llm.scores[7][:4].tolist())
"""


def gib(b):
    return f"{b / 2**30:.2f} GiB"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--stages", default="make,load,train,export")
    ap.add_argument("--skip-reference", action="store_true")
    ap.add_argument("--skip-ours", action="store_true", help="reference only (ours ran before)")
    args = ap.parse_args()
    stages = args.stages.split(",")
    print(f"CPU: {cpu_name()}; {os.cpu_count()} cores")
    model = make_checkpoint() if "make" in stages else OUT / "model"
    rows = []
    config = train_config(model)
    plan = subprocess.run([str(QLORA), "plan", str(config)], capture_output=True, text=True)
    print(plan.stdout)
    if "load" in stages and not args.skip_ours:
        wall, peak = timed([QLORA, "quantize", "--model", model, "--out", OUT / "bnb"])
        rows.append(("load + NF4 quantise (ours, qlora quantize)", wall, peak))
        if not args.skip_reference:
            p = subprocess.run([PY, "-c", REFERENCE_LOAD, str(model)], capture_output=True, text=True)
            if p.returncode == 0:
                w, r = map(float, p.stdout.split()[-2:])
                rows.append(("load_in_4bit (transformers + bitsandbytes)", w, int(r)))
            else:
                rows.append(("load_in_4bit (transformers + bitsandbytes): failed", 0, 0))
    if "train" in stages:
        if not args.skip_ours:
            wall, peak = timed([QLORA, "train", config])
            rows.append(("one QLoRA step, load included (ours)", wall, peak))
        metrics = [json.loads(l) for l in (OUT / "run" / "metrics.jsonl").read_text().splitlines()]
        step = next(m for m in metrics if "loss" in m)
        tokens = step["tokens"]  # the packed row of the text: the reference gets as many
        rows.append((f"  of which the step ({tokens} tokens, {step['seconds'] / tokens:.3f} s/token)",
                     step["seconds"], 0))
        if not args.skip_reference:
            p = subprocess.run([PY, "-c", REFERENCE_TRAIN, str(model), str(tokens)],
                               capture_output=True, text=True)
            if p.returncode == 0:
                w, r = map(float, p.stdout.split()[-2:])
                rows.append((f"one step (transformers + PEFT + bitsandbytes, {w / tokens:.3f} s/token)",
                             w, int(r)))
            else:
                rows.append(("transformers + PEFT + bitsandbytes step: failed " + p.stderr[-200:], 0, 0))
    if "export" in stages:
        out = OUT / "merged.q4_k_m.gguf"
        wall, peak = timed([QLORA, "export", config, "--adapter", OUT / "run" / "adapter", "--format",
                            "gguf", "--outtype", "q4_k_m", "--out", out])
        rows.append((f"export Q4_K_M GGUF ({out.stat().st_size / 2**30:.2f} GiB)", wall, peak))
        p = subprocess.run([PY, "-c", LLAMA_CPP_EVAL, str(out)], capture_output=True, text=True)
        rows.append(("llama.cpp loads it and evaluates 8 tokens: " +
                     ("ok" if p.returncode == 0 else f"failed {p.stderr[-300:]}"),
                     float(p.stdout.split()[0]) if p.returncode == 0 else 0, 0))
    print(f"{'step':<60}{'wall s':>10}{'peak RSS':>14}")
    for name, wall, peak in rows:
        print(f"{name:<60}{wall:>10.1f}{gib(peak) if peak else '':>14}")


if __name__ == "__main__":
    main()
