"""QLoRA training step of a Llama-3.1-8B-shaped model on one GPU: ours against
transformers + PEFT on the same GPU in the same run.

Ours (build/benchmarks/gpu_train_step): random weights drawn on the device,
NF4 + double quantisation, LoRA r 16 on all linear layers (alpha 32, no
dropout), bf16 compute, seq 2048 x batch 2, gradient checkpointing, paged
8-bit AdamW. The reference: transformers' LlamaForCausalLM in bf16 with
PEFT LoRA r 16 on all linear layers, gradient checkpointing, torch AdamW
(bitsandbytes is not installed on the GPU machines, so it is bf16 LoRA, not
QLoRA: 16-bit base weights). Each side runs in its own process, so the peak
VRAM is its own. Published anchors are printed beside the figures.

    python3 benchmarks/bench_gpu.py --ours build-gpu/benchmarks/gpu_train_step [--steps 5] [--json out.json]
"""
import argparse
import json
import subprocess
import sys
import time

ANCHORS = [
    ("Unsloth NF4 QLoRA, Qwen3-8B, H200 (published)", "8.4k tokens/s"),
    ("torchtune QLoRA, Llama-3.1-8B (published)", "7.4 GiB peak"),
    ("aim (issue 13)", ">= 9k tokens/s on an H200, <= 7 GiB peak VRAM"),
]

REFERENCE = r"""
import json, sys, time, torch
from transformers import LlamaConfig, LlamaForCausalLM
from peft import LoraConfig, get_peft_model
seq, batch, steps, warmup, layers = map(int, sys.argv[1:6])
cfg = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
                  num_attention_heads=32, num_key_value_heads=8, rms_norm_eps=1e-5, rope_theta=500000.0,
                  max_position_embeddings=131072, tie_word_embeddings=False)
cfg._attn_implementation = "sdpa"
torch.manual_seed(0)
t0 = time.time()
torch.set_default_dtype(torch.bfloat16)  # built in bf16 on the GPU directly
with torch.device("cuda"):
    model = LlamaForCausalLM(cfg)
torch.set_default_dtype(torch.float32)
model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
model.enable_input_require_grads()
model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear"))
model.train()
torch.cuda.synchronize()
build = time.time() - t0
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4, fused=True)
ids = torch.randint(cfg.vocab_size, (batch, seq), device="cuda")
torch.cuda.reset_peak_memory_stats()
timed = 0.0
for s in range(warmup + steps):
    torch.cuda.synchronize(); t = time.time()
    opt.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    loss = loss.item()
    if s >= warmup:
        timed += time.time() - t
print(json.dumps({"tokens_per_second": steps * batch * seq / timed, "step_seconds": timed / steps,
                  "peak_vram_bytes": torch.cuda.max_memory_allocated(), "build_seconds": build,
                  "loss": loss, "device": torch.cuda.get_device_name(0)}))
"""


def run(cmd, timeout):
    t = time.time()
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if res.returncode != 0:
        sys.stderr.write(res.stderr[-4000:])
        return {"error": f"exit {res.returncode}", "stderr_tail": res.stderr[-2000:]}
    line = [l for l in res.stdout.splitlines() if l.startswith("{")][-1]
    out = json.loads(line)
    out["wall_seconds"] = time.time() - t
    return out


def gib(b):
    return f"{b / 2**30:.2f} GiB"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ours", default="build/benchmarks/gpu_train_step")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--skip-reference", action="store_true")
    ap.add_argument("--json")
    a = ap.parse_args()
    shape = ["--seq", str(a.seq), "--batch", str(a.batch), "--steps", str(a.steps),
             "--warmup", str(a.warmup), "--layers", str(a.layers)]
    results = {"config": vars(a)}
    results["ours"] = run([a.ours, *shape], timeout=900)
    results["ours_selective"] = run([a.ours, *shape, "--selective"], timeout=900)
    if not a.skip_reference:
        results["transformers_peft_bf16_lora"] = run(
            [sys.executable, "-c", REFERENCE, str(a.seq), str(a.batch), str(a.steps), str(a.warmup),
             str(a.layers)], timeout=900)
    print(f"Llama-3.1-8B-shaped ({a.layers} layers), seq {a.seq} x batch {a.batch}, LoRA r 16 all-linear, "
          f"gradient checkpointing, {a.steps} timed steps after {a.warmup}")
    for name, r in results.items():
        if name == "config":
            continue
        if "error" in r:
            print(f"  {name:32s} FAILED: {r['error']}")
            continue
        print(f"  {name:32s} {r['tokens_per_second']:9.0f} tokens/s  step {r['step_seconds']:.3f} s  "
              f"peak {gib(r['peak_vram_bytes'])}  ({r.get('device', '')})")
    ours, ref = results.get("ours", {}), results.get("transformers_peft_bf16_lora", {})
    if "tokens_per_second" in ours and "tokens_per_second" in ref:
        print(f"  ratio ours / transformers+PEFT: {ours['tokens_per_second'] / ref['tokens_per_second']:.2f}x "
              f"tokens/s, {ours['peak_vram_bytes'] / ref['peak_vram_bytes']:.2f}x peak VRAM")
    for what, figure in ANCHORS:
        print(f"  anchor: {what}: {figure}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
