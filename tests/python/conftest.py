"""Shared fixtures: the built libqlora_ops (the ops alone, as Python users load them) and
small helpers for the conformance tests."""
import os
import pathlib
import subprocess
import sys
import tempfile

import pytest
import torch

REPO = pathlib.Path(__file__).resolve().parents[2]
BUILD = pathlib.Path(os.environ.get("QLORA_BUILD_DIR", REPO / "build"))
LIBRARY = os.environ.get("QLORA_LIBRARY", str(BUILD / "csrc" / "libqlora_ops.so"))

torch.ops.load_library(LIBRARY)


@pytest.fixture(scope="session")
def build_dir():
    return BUILD


def run_tool(name, *args):
    """Runs one of our C++ test tools; returns CompletedProcess (never raises)."""
    exe = BUILD / "tests" / name
    assert exe.exists(), f"{exe} not built"
    return subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, timeout=600)


# ---- llama.cpp itself (llama-cpp-python, a test oracle only) ------------------------

LLAMA_CPP_EVAL = """
import sys, numpy as np, llama_cpp
path, lora, ids, out = sys.argv[1], sys.argv[2] or None, sys.argv[3], sys.argv[4]
if ids.startswith("text:"):  # tokenise a text file with the model's own vocabulary
    llm = llama_cpp.Llama(model_path=path, vocab_only=True, verbose=False)
    n_max = int(sys.argv[5])
    ids = llm.tokenize(open(ids[5:], "rb").read(), add_bos=True)[:n_max]
    del llm
else:
    ids = [int(t) for t in ids.split(",")]
n = len(ids)
llm = llama_cpp.Llama(model_path=path, lora_path=lora, n_ctx=max(64, n), n_batch=max(64, n),
                      logits_all=True, n_threads=2, verbose=False)
llm.eval(ids)
np.savez(out, logits=np.array(llm.scores[:n], dtype=np.float32), ids=np.array(ids))
"""


def llama_cpp_eval(path, ids, lora_path=None, max_tokens=0):
    """(logits, ids): llama.cpp's float32 logits for the GGUF at `path`, on the token ids
    `ids`, or on a text file's tokens (ids = "text:FILE", at most max_tokens). Run in a fresh
    interpreter: in one that holds libqlora and libtorch, llama.cpp dies with SIGILL."""
    pytest.importorskip("llama_cpp")
    ids = ids if isinstance(ids, str) else ",".join(map(str, ids))
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "logits.npz")
        p = subprocess.run([sys.executable, "-c", LLAMA_CPP_EVAL, str(path), str(lora_path or ""),
                            ids, out, str(max_tokens)], capture_output=True, text=True,
                           timeout=600)
        assert p.returncode == 0, (f"llama.cpp could not run {path} (exit {p.returncode}):\n"
                                   f"{p.stderr[-3000:]}")
        import numpy as np
        with np.load(out) as f:
            return f["logits"], f["ids"].tolist()


def llama_cpp_logits(path, lora_path=None, ids=range(16)):
    """llama.cpp's float32 logits for the token ids `ids` of the GGUF at `path`."""
    return llama_cpp_eval(path, list(ids), lora_path)[0]


def llama_cpp_or_skip(path, ids, **kwargs):
    """llama_cpp_eval, or a skip where its quantized CPU kernels cannot run here (a
    llama-cpp-python build for another CPU dies with SIGILL: seen on one of our machines)."""
    try:
        return llama_cpp_eval(path, ids, **kwargs)
    except AssertionError as e:
        if "exit -4" in str(e) or "SIGILL" in str(e):
            pytest.skip(f"llama.cpp's quantized kernels cannot run on this CPU: {str(e)[:300]}")
        raise
