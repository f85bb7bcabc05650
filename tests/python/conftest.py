"""Shared fixtures: the built libqlora_ops (the ops alone, as Python users load them) and
small helpers for the conformance tests."""
import os
import pathlib
import subprocess

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
