"""Our LoRA/DoRA layers against Hugging Face PEFT (pinned, CPU), both ways:
adapters we save load in PEFT and give our outputs and gradients (on the
dequantised base), adapters PEFT saves load in our C++ model with PEFT's
outputs; and the TorchScript export loads in Python with our outputs."""
import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

from conftest import run_tool

HIDDEN, KV, INTER = 32, 16, 48
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class Attention(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = torch.nn.Linear(HIDDEN, HIDDEN)
        self.k_proj = torch.nn.Linear(HIDDEN, KV, bias=False)
        self.v_proj = torch.nn.Linear(HIDDEN, KV, bias=False)
        self.o_proj = torch.nn.Linear(HIDDEN, HIDDEN, bias=False)

    def forward(self, x):
        return self.o_proj(self.q_proj(x) * torch.cat([self.k_proj(x), self.v_proj(x)], -1).sigmoid())


class Mlp(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.gate_proj = torch.nn.Linear(HIDDEN, INTER, bias=False)
        self.up_proj = torch.nn.Linear(HIDDEN, INTER, bias=False)
        self.down_proj = torch.nn.Linear(INTER, HIDDEN)

    def forward(self, x):
        return self.down_proj(torch.nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class Layer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.self_attn = Attention()
        self.mlp = Mlp()

    def forward(self, x):
        h = x + self.self_attn(x)
        return h + self.mlp(h)


class Inner(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList([Layer()])


class Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.model = Inner()

    def forward(self, x):
        return self.model.layers[0](x)


def base_model(weights=None):
    torch.manual_seed(0)
    m = Model()
    if weights is not None:
        m.load_state_dict(weights, strict=False)
    return m


def write_config(path, use_dora, use_rslora=False):
    path.mkdir(exist_ok=True)
    cfg = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": TARGETS,
           "use_dora": use_dora, "use_rslora": use_rslora, "bias": "none", "task_type": "CAUSAL_LM"}
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    return cfg


def inputs(tmp_path):
    torch.manual_seed(1)
    x, g = torch.randn(3, 5, HIDDEN), torch.randn(3, 5, HIDDEN)
    save_file({"x": x, "g": g}, str(tmp_path / "inputs.safetensors"))
    return x, g


def run_cpp(tmp_path, cfg_dir, *extra):
    weights = tmp_path / "weights.safetensors"
    if not weights.exists():
        save_file({k: v.contiguous() for k, v in base_model().state_dict().items()}, str(weights))
    out = tmp_path / "out.safetensors"
    res = run_tool("lora_tool", "peft", weights, cfg_dir, tmp_path / "inputs.safetensors", out, *extra)
    assert res.returncode == 0, res.stderr
    return load_file(str(out))


@pytest.mark.parametrize("quant", [False, True], ids=["lora", "qlora"])
@pytest.mark.parametrize("use_dora,use_rslora", [(False, False), (False, True), (True, False)],
                         ids=["plain", "rslora", "dora"])
def test_our_adapter_loads_in_peft_with_equal_outputs_and_gradients(tmp_path, quant, use_dora, use_rslora):
    write_config(tmp_path / "cfg", use_dora, use_rslora)
    x, g = inputs(tmp_path)
    ours = run_cpp(tmp_path, tmp_path / "cfg", *(["--quant"] if quant else []), "--save", tmp_path / "adapter")
    # The toy model is no transformers causal LM: load it as a plain PeftModel.
    cfg_file = tmp_path / "adapter" / "adapter_config.json"
    saved = json.loads(cfg_file.read_text())
    assert saved["task_type"] == "CAUSAL_LM" and saved["peft_type"] == "LORA"
    cfg_file.write_text(json.dumps({**saved, "task_type": None}))
    # PEFT on the very base weights our layers used (dequant(W) for QLoRA).
    base = {k: v for k, v in ours.items() if not k.startswith("base_model.") and k != "y"}
    model = PeftModel.from_pretrained(base_model(base), str(tmp_path / "adapter"), is_trainable=True)
    model.eval()
    y = model(x)
    torch.testing.assert_close(y, ours["y"], rtol=1e-5, atol=1e-5)
    (y * g).sum().backward()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        key = name.replace(".default", "")
        if "lora_magnitude_vector" in key:
            key = key.removesuffix(".weight")
        torch.testing.assert_close(p.grad, ours[key + ".grad"], rtol=1e-4, atol=1e-5, msg=key)


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_peft_adapter_loads_in_cpp_with_equal_outputs(tmp_path, use_dora):
    x, _ = inputs(tmp_path)
    torch.manual_seed(5)
    peft_model = get_peft_model(base_model(), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                          use_dora=use_dora, init_lora_weights=False))
    peft_model.eval()
    expected = peft_model(x)
    peft_model.save_pretrained(str(tmp_path / "peft_adapter"))
    ours = run_cpp(tmp_path, tmp_path / "peft_adapter", "--load", tmp_path / "peft_adapter")
    torch.testing.assert_close(ours["y"], expected, rtol=1e-5, atol=1e-5)


def test_mismatched_adapter_is_a_clear_error(tmp_path):
    inputs(tmp_path)
    peft_model = get_peft_model(base_model(), LoraConfig(r=8, lora_alpha=8, target_modules=TARGETS))
    peft_model.save_pretrained(str(tmp_path / "r8"))
    write_config(tmp_path / "cfg", use_dora=False)  # r = 4
    weights = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in base_model().state_dict().items()}, str(weights))
    res = run_tool("lora_tool", "peft", weights, tmp_path / "cfg", tmp_path / "inputs.safetensors",
                   tmp_path / "out.safetensors", "--load", tmp_path / "r8")
    assert res.returncode == 1
    assert "does not fit the model" in res.stderr and "has shape [8, 32], the model expects [4, 32]" in res.stderr


def test_torchscript_export_loads_in_python(tmp_path):
    res = run_tool("lora_tool", "script", tmp_path / "model.pt", tmp_path / "xy.safetensors")
    assert res.returncode == 0, res.stderr
    module = torch.jit.load(str(tmp_path / "model.pt"))
    xy = load_file(str(tmp_path / "xy.safetensors"))
    torch.testing.assert_close(module(xy["x"]), xy["y"], rtol=1e-5, atol=1e-6)
    assert "qlora.matmul_4bit" in module.layer0.code
