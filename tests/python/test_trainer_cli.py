"""`qlora train` end to end on a tiny random LLaMA: losses against transformers +
PEFT + torch AdamW, exact resume after SIGKILL (and never from a half-written
checkpoint), and config errors that exit non-zero without writing anything."""
import json
import os
import signal
import subprocess
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import BUILD

QLORA = BUILD / "tools" / "qlora"
WORDS = ("river stone lantern harbor quickly bright forest ember meadow silver thunder gentle "
         "whisper orchard candle valley copper marble anchor falcon").split()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random 2-layer LLaMA with a byte-level BPE tokenizer and an Alpaca dataset."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("tiny")
    records = []
    for i, w in enumerate(WORDS * 3):
        records.append({"instruction": f"Define the word \"{w}\".", "input": "",
                        "output": f"{w} ({['noun', 'verb', 'adjective'][i % 3]}): a thing called {w}."})
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [json.dumps(r) for r in records] + ["### Instruction:\n### Response:\nBelow is an instruction"]
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    model_dir = root / "model"
    model_dir.mkdir()
    tok.save(str(model_dir / "tokenizer.json"))
    (model_dir / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<eos>"}))
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=256, eos_token_id=tok.token_to_id("<eos>"),
                      tie_word_embeddings=False)
    LlamaForCausalLM(cfg).save_pretrained(str(model_dir))
    return {"root": root, "model": model_dir, "data": data, "records": records, "tokenizer": tok}


def write_config(path, tiny, out, **overrides):
    cfg = {
        "model": {"path": str(tiny["model"]), "quantize": True, "blocksize": 32},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.1, "target_modules": ["all-linear"]},
        "data": {"train": str(tiny["data"]), "eval_split": 0.2, "max_length": 64},
        "training": {"max_steps": 8, "micro_batch_size": 4, "gradient_accumulation_steps": 2,
                     "lr": 5e-3, "warmup_steps": 2, "optimizer": "paged_adamw_8bit",
                     "gradient_checkpointing": True, "save_every": 2, "eval_every": 4,
                     "keep_last": 3, "threads": 1, "seed": 7},
        "output_dir": str(out),
        "resume": "auto",
    }
    for key, value in overrides.items():
        section, _, name = key.partition("__")
        if name:
            cfg[section][name] = value
        else:
            cfg[section] = value
    path.write_text(json.dumps(cfg))  # JSON is YAML
    return path


def run(config, *args, check=True):
    res = subprocess.run([str(QLORA), "train", str(config), *args], capture_output=True, text=True,
                         timeout=600)
    if check:
        assert res.returncode == 0, res.stderr[-3000:]
    return res


def train_losses(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_resume_after_sigkill_is_bit_identical(tiny, tmp_path):
    straight = tmp_path / "straight"
    run(write_config(tmp_path / "a.yaml", tiny, straight))
    expected = train_losses(straight)
    assert sorted(expected) == list(range(1, 9))

    killed = tmp_path / "killed"
    config = write_config(tmp_path / "b.yaml", tiny, killed)
    proc = subprocess.Popen([str(QLORA), "train", str(config)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (killed / "checkpoint-4" / "trainer_state.json").exists():
        assert proc.poll() is None and time.time() < deadline, "run ended before checkpoint-4"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    # A checkpoint write cut short leaves a temp folder or a folder without its
    # state file; neither may be resumed from.
    (killed / ".tmp-checkpoint-6-999").mkdir(exist_ok=True)
    (killed / ".tmp-checkpoint-6-999" / "trainer_state.json").write_text("{}")
    (killed / "checkpoint-7").mkdir(exist_ok=True)
    res = run(config)
    assert "resumed from" in res.stderr
    got = train_losses(killed)
    assert got == expected  # bit-identical losses for every step, before and after the kill
    a = load_file(str(straight / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(killed / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    summary = json.loads((killed / "summary.json").read_text())
    assert summary["resumed_from_step"] >= 4
    assert sorted(p.name for p in killed.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6",
                                                                   "checkpoint-8"]
    assert (killed / "loss_curve.svg").read_text().startswith("<svg")


def full_batch_config(model_path, tiny, **model_keys):
    """Plain LoRA, no dropout, one full batch per step (data order cannot matter)."""
    common = dict(model={"path": str(model_path), "quantize": False, **model_keys},
                  lora={"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["all-linear"]},
                  data={"train": str(tiny["data"]), "max_length": 512})
    train = {"micro_batch_size": len(tiny["records"]), "gradient_accumulation_steps": 1,
             "optimizer": "adamw", "scheduler": "constant", "weight_decay": 0.0,
             "max_grad_norm": 0.0, "threads": 1, "seed": 3}
    return common, train


def peft_adamw_losses(model, adapter_dir, tiny, steps, lr):
    """The losses of transformers + PEFT (starting from our adapter) + torch AdamW on the
    full batch, tokenised as our Alpaca template does."""
    from peft import PeftModel

    tok = tiny["tokenizer"]
    eos = tok.token_to_id("<eos>")
    header = ("Below is an instruction that describes a task. Write a response that appropriately "
              "completes the request.\n\n### Instruction:\n{}\n\n### Response:")
    rows = []
    for r in tiny["records"]:
        prompt = tok.encode(header.format(r["instruction"])).ids
        completion = tok.encode(r["output"]).ids + [eos]
        rows.append((prompt + completion, [-100] * len(prompt) + completion))
    width = max(len(ids) for ids, _ in rows)
    ids = torch.tensor([i + [eos] * (width - len(i)) for i, _ in rows])
    labels = torch.tensor([l + [-100] * (width - len(l)) for _, l in rows])
    mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i, _ in rows])

    assert json.loads((adapter_dir / "adapter_config.json").read_text())["r"] == 4
    model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=True)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    theirs = {}
    for step in range(1, steps + 1):
        opt.zero_grad()
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        opt.step()
        theirs[step] = out.loss.item()
    return theirs


def test_losses_match_transformers_peft_adamw(tiny, tmp_path):
    """Plain LoRA against transformers + PEFT + torch.optim.AdamW."""
    from transformers import AutoModelForCausalLM

    common, train = full_batch_config(tiny["model"], tiny)
    init = tmp_path / "init"
    run(write_config(tmp_path / "init.yaml", tiny, init, **common,
                     training={**train, "max_steps": 1, "lr": 0.0}))
    ours = tmp_path / "ours"
    run(write_config(tmp_path / "ours.yaml", tiny, ours, **common, training={**train, "max_steps": 5, "lr": 1e-2}))
    our_losses = train_losses(ours)
    model = AutoModelForCausalLM.from_pretrained(str(tiny["model"]), dtype=torch.float32)
    theirs = peft_adamw_losses(model, init / "adapter", tiny, 5, 1e-2)
    for step in range(1, 6):
        assert our_losses[step] == pytest.approx(theirs[step], rel=1e-4, abs=1e-5), (step, our_losses, theirs)


@pytest.mark.parametrize("outtype", ["q4_0", "q8_0"])
def test_gguf_native_training_matches_peft_on_the_dequantised_gguf(tiny, tmp_path, outtype):
    """model.base_format: gguf-native trains LoRA on the file's own blocks: the losses are
    those of transformers + PEFT on the model transformers dequantises from the same GGUF."""
    from transformers import AutoModelForCausalLM

    gguf_file = tmp_path / f"tiny.{outtype}.gguf"
    res = subprocess.run([str(QLORA), "export", "--model", str(tiny["model"]), "--format", "gguf",
                          "--outtype", outtype, "--out", str(gguf_file), "--set", "model.quantize=false"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    common, train = full_batch_config(gguf_file, tiny, base_format="gguf-native",
                                      tokenizer=str(tiny["model"]))
    init = tmp_path / "init"
    run(write_config(tmp_path / "init.yaml", tiny, init, **common,
                     training={**train, "max_steps": 1, "lr": 0.0}))
    ours = tmp_path / "ours"
    run(write_config(tmp_path / "ours.yaml", tiny, ours, **common,
                     training={**train, "max_steps": 5, "lr": 1e-2}))
    our_losses = train_losses(ours)
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=gguf_file.name,
                                                 dtype=torch.float32)
    theirs = peft_adamw_losses(model, init / "adapter", tiny, 5, 1e-2)
    # The same weights on both sides: equal up to float32 summation order (4e-7 seen).
    for step in range(1, 6):
        assert our_losses[step] == pytest.approx(theirs[step], rel=2e-6, abs=0), (step, our_losses, theirs)
    # The requantised run is a different model (5e-5 apart at step 1 on this near-uniform
    # random model): the check can tell them apart.
    nf4 = tmp_path / "nf4"
    run(write_config(tmp_path / "nf4.yaml", tiny, nf4,
                     **{**common, "model": {**common["model"], "base_format": "requantize",
                                            "quantize": True, "blocksize": 32}},
                     training={**train, "max_steps": 1, "lr": 0.0}))
    assert abs(train_losses(nf4)[1] / theirs[1] - 1) > 1e-5


def test_config_errors_exit_nonzero_and_write_nothing(tiny, tmp_path):
    out = tmp_path / "never"
    bad = write_config(tmp_path / "bad.yaml", tiny, out, training={"max_steps": 2, "lrr": 1.0})
    res = run(bad, check=False)
    assert res.returncode == 1
    assert 'unknown key "training.lrr"' in res.stderr and "training.lr" in res.stderr
    assert not out.exists()
    res = run(write_config(tmp_path / "ok.yaml", tiny, out), "--set", "training.optimizer=sgd", check=False)
    assert res.returncode == 1 and "training.optimizer" in res.stderr and not out.exists()
    missing = write_config(tmp_path / "missing.yaml", tiny, out, data={"train": str(tmp_path / "nope.jsonl")})
    res = run(missing, check=False)
    assert res.returncode == 1 and "nope.jsonl" in res.stderr
    res = subprocess.run([str(QLORA), "train"], capture_output=True, text=True)
    assert res.returncode != 0 and "config" in res.stderr
    res = run(write_config(tmp_path / "ok.yaml", tiny, out), "--set", "training.device=tpu", check=False)
    assert res.returncode == 1 and '"training.device" must be auto, cpu, cuda or cuda:N' in res.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is visible")
def test_a_cuda_run_without_a_gpu_is_a_clear_error(tiny, tmp_path):
    out = tmp_path / "never"
    res = run(write_config(tmp_path / "gpu.yaml", tiny, out), "--set", "training.device=cuda",
              check=False)
    assert res.returncode == 1
    assert "training.device: cuda, but no CUDA device is visible" in res.stderr, res.stderr[-2000:]
    assert not out.exists()


def test_explicit_cpu_device_trains_like_auto_on_a_cpu_machine(tiny, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("auto picks the GPU here")
    base = dict(training={"max_steps": 3, "micro_batch_size": 4, "gradient_accumulation_steps": 1,
                          "lr": 5e-3, "optimizer": "paged_adamw_8bit", "save_every": 0,
                          "threads": 1, "seed": 7})
    a = tmp_path / "auto"
    b = tmp_path / "cpu"
    run(write_config(tmp_path / "a.yaml", tiny, a, **base))
    run(write_config(tmp_path / "b.yaml", tiny, b, **base), "--set", "training.device=cpu")
    assert train_losses(a) == train_losses(b)
    summary = json.loads((b / "summary.json").read_text())
    assert summary["device"] == "cpu" and summary["peak_device_bytes"] == 0


def test_quantize_writes_a_bnb_folder_that_transformers_and_we_load(tiny, tmp_path):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    out = tmp_path / "q"
    res = subprocess.run([str(QLORA), "quantize", "--model", str(tiny["model"]), "--out", str(out),
                          "--blocksize", "32"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["load_in_4bit"] and cfg["bnb_4bit_quant_type"] == "nf4" and cfg["bnb_4bit_use_double_quant"]
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        packed = f.get_tensor("model.layers.0.self_attn.q_proj.weight")
    import bitsandbytes.functional as F
    dense = AutoModelForCausalLM.from_pretrained(str(tiny["model"]), dtype=torch.float32)
    ref_packed, _ = F.quantize_4bit(dense.model.layers[0].self_attn.q_proj.weight.detach(), blocksize=32,
                                    quant_type="nf4", compress_statistics=True)
    assert torch.equal(packed, ref_packed)  # bitsandbytes' bytes
    assert "model.layers.0.self_attn.q_proj.weight.quant_state.bitsandbytes__nf4" in keys
    assert "lm_head.weight" in keys and (out / "tokenizer.json").exists()
    ids = torch.tensor([[5, 17, 42, 99, 3]])
    reference = AutoModelForCausalLM.from_pretrained(str(tiny["model"]), dtype=torch.float32)
    quantized = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    quantized.train()  # bitsandbytes repacks weights in eval mode on some CPUs
    with torch.no_grad():
        a = reference(ids).logits
        b = quantized(ids).logits
    # 4-bit quantisation moves the logits, but not far (the reference is the dense model).
    assert (a - b).abs().max() < 0.5 * a.abs().max()
    res = subprocess.run([str(QLORA), "inspect", str(out / "model.safetensors")], capture_output=True, text=True)
    assert res.returncode == 0 and "quant_state.bitsandbytes__nf4" in res.stdout


def test_export_hf_merged_and_peft_match_peft_on_the_4bit_base(tiny, tmp_path):
    """The merged HF folder equals PEFT's adapter applied to the same 4-bit base:
    the merge is into dequant(W), not into the original weight."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    run(write_config(tmp_path / "c.yaml", tiny, out, training={"max_steps": 3, "lr": 1e-2, "threads": 1},
                     lora={"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["all-linear"]}))
    common = ["--model", str(tiny["model"]), "--adapter", str(out / "adapter"), "--set", "model.blocksize=32"]
    for fmt, dest in [("hf", tmp_path / "hf"), ("peft", tmp_path / "peft")]:
        res = subprocess.run([str(QLORA), "export", *common, "--format", fmt, "--out", str(dest),
                              "--outtype", "f32"], capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr
    bnb_dir = tmp_path / "bnb"
    res = subprocess.run([str(QLORA), "quantize", "--model", str(tiny["model"]), "--out", str(bnb_dir),
                          "--blocksize", "32"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    # Reference: PEFT applied to a dense model holding the dequantised 4-bit base
    # (read from the bitsandbytes folder with bitsandbytes' own dequantize_4bit).
    import bitsandbytes.functional as F
    from bitsandbytes.functional import QuantState
    from safetensors.torch import load_file as load_st

    q = load_st(str(bnb_dir / "model.safetensors"))
    base = AutoModelForCausalLM.from_pretrained(str(tiny["model"]), dtype=torch.float32)
    with torch.no_grad():
        for name, module in base.named_modules():
            if isinstance(module, torch.nn.Linear) and name + ".weight.absmax" in q:
                prefix = name + ".weight."
                state = QuantState.from_dict({k[len(prefix):]: v for k, v in q.items() if k.startswith(prefix)},
                                             torch.device("cpu"))
                module.weight.copy_(F.dequantize_4bit(q[name + ".weight"], state))
    peft = PeftModel.from_pretrained(base, str(tmp_path / "peft"))
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32)
    ids = torch.tensor([[5, 17, 42, 99, 3, 7, 8]])
    with torch.no_grad():
        a = merged(ids).logits
        b = peft(ids).logits
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert (tmp_path / "hf" / "tokenizer.json").exists()
    # The native container: exported, then summarised with its checksums verified.
    res = subprocess.run([str(QLORA), "export", *common, "--format", "qnat", "--out", str(tmp_path / "m.qnat")],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    res = subprocess.run([str(QLORA), "inspect", str(tmp_path / "m.qnat")], capture_output=True, text=True)
    assert res.returncode == 0 and "QNAT" in res.stdout and "adapter included" in res.stdout
