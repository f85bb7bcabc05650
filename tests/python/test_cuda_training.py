"""`qlora train` with training.device: cuda (ctest label cuda; skipped without a GPU): a
20-step QLoRA fine-tune on the GPU equals the CPU run, checkpoints move between the GPU and
the CPU in both directions, the default (auto) bf16 run trains, and the NCCL data-parallel
path runs."""
import json
import shutil

import pytest
import torch

from test_trainer_cli import QLORA, run, tiny, train_losses, write_config  # noqa: F401

if not torch.cuda.is_available():
    pytest.skip("no CUDA device", allow_module_level=True)

STEPS = 20


def config(tmp_path, tiny, out, name, device, **training):
    # float32 compute on both devices: the comparison is of the code paths,
    # not of bf16 rounding.
    train = {"max_steps": STEPS, "micro_batch_size": 4, "gradient_accumulation_steps": 2,
             "lr": 5e-3, "warmup_steps": 2, "optimizer": "paged_adamw_8bit",
             "gradient_checkpointing": True, "save_every": 10, "eval_every": 10, "keep_last": 5,
             "threads": 4, "seed": 7, "device": device, **training}
    return write_config(tmp_path / name, tiny, out, training=train,
                        model={"path": str(tiny["model"]), "quantize": True, "blocksize": 32,
                               "compute_dtype": "float32"})


def close(a, b, tol=1e-3):
    assert a.keys() == b.keys()
    for k in a:
        assert abs(a[k] - b[k]) <= tol, (k, a[k], b[k])


def test_twenty_steps_on_the_gpu_equal_the_cpu_run(tiny, tmp_path):
    gpu, cpu = tmp_path / "gpu", tmp_path / "cpu"
    # selective recomputation: the frozen matmuls' outputs replayed on the device too
    run(config(tmp_path, tiny, gpu, "gpu.yaml", "cuda", selective_recompute=True))
    run(config(tmp_path, tiny, cpu, "cpu.yaml", "cpu", selective_recompute=True))
    lg, lc = train_losses(gpu), train_losses(cpu)
    assert len(lg) == STEPS
    close(lg, lc)
    summary = json.loads((gpu / "summary.json").read_text())
    assert summary["device"] == "cuda:0" and summary["peak_device_bytes"] > 0
    eg = json.loads((cpu / "summary.json").read_text())["eval_loss_after"]
    assert abs(summary["eval_loss_after"] - eg) <= 1e-3


@pytest.mark.parametrize("first,then", [("cuda", "cpu"), ("cpu", "cuda")])
def test_checkpoints_move_between_gpu_and_cpu(tiny, tmp_path, first, then):
    straight = tmp_path / "straight"
    run(config(tmp_path, tiny, straight, "a.yaml", first))
    expected = train_losses(straight)
    moved = tmp_path / "moved"
    moved.mkdir()
    shutil.copytree(straight / "checkpoint-10", moved / "checkpoint-10")
    run(config(tmp_path, tiny, moved, "b.yaml", then))
    got = train_losses(moved)
    assert min(got) == 11
    close({k: v for k, v in expected.items() if k > 10}, got)


def test_auto_trains_in_bfloat16_on_the_gpu(tiny, tmp_path):
    out = tmp_path / "auto"
    # packed rows: the segment-masked attention path on the device
    path = write_config(tmp_path / "auto.yaml", tiny, out,
                        training={"max_steps": STEPS, "micro_batch_size": 4, "lr": 5e-3,
                                  "optimizer": "paged_adamw_8bit", "seed": 7},
                        data={"train": str(tiny["data"]), "eval_split": 0.2, "max_length": 64,
                              "packing": True})
    res = run(path)
    assert "compute BFloat16" in res.stderr + res.stdout
    losses = train_losses(out)
    assert all(v == v for v in losses.values())  # finite
    assert losses[STEPS] < losses[1]


def test_nccl_data_parallel_runs_and_matches_one_process(tiny, tmp_path):
    single, dist = tmp_path / "single", tmp_path / "dist"
    run(config(tmp_path, tiny, single, "s.yaml", "cuda", max_steps=6))
    # One rank per GPU: as many ranks as this machine has GPUs (at least the NCCL path runs).
    n = torch.cuda.device_count()
    run(config(tmp_path, tiny, dist, "d.yaml", "cuda", max_steps=6, micro_batch_size=4 // min(n, 4),
               gradient_accumulation_steps=2),
        "--nproc-per-node", str(min(n, 4)), "--set", "training.distributed.backend=nccl")
    close(train_losses(single), train_losses(dist), tol=1e-4)
