"""Data-parallel `qlora train` on c10d (Gloo over 127.0.0.1) with a tiny random LLaMA:
2 ranks x micro-batch m train exactly as 1 rank x 2m and as 1 rank x m with 2 accumulation
steps (losses and adapter, float32, a short last step where rank 1 has no rows included);
rank 0 alone writes; a SIGKILLed or hung worker makes the other fail within the timeout and
the launcher exit non-zero, and resume continues with 1 or 2 ranks as an uninterrupted run
would; Ctrl-C on the launcher stops every rank at the same step boundary with one checkpoint."""
import json
import os
import shutil
import signal
import subprocess
import time

import pytest
import torch
from safetensors.torch import load_file

from test_trainer_cli import QLORA, tiny, train_losses, write_config  # noqa: F401

TIMEOUT = 15  # training.distributed.timeout_seconds in the failure tests


@pytest.fixture(scope="module")
def data21(tiny, tmp_path_factory):
    """21 training examples (21 = 5 x 4 + 1: with 2 ranks x 2 rows the last step gives rank 0
    one row and rank 1 none) and a separate eval file."""
    root = tmp_path_factory.mktemp("data21")
    recs = tiny["records"]
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs[:21]))
    (root / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs[21:29]))
    return root


def dp_config(path, tiny, data21, out, **overrides):
    base = dict(lora__dropout=0.0, data__train=str(data21 / "train.jsonl"),
                data__eval=str(data21 / "eval.jsonl"), data__eval_split=0.0, data__max_length=128,
                training__max_steps=-1, training__epochs=2, training__micro_batch_size=4,
                training__gradient_accumulation_steps=1, training__optimizer="paged_adamw_32bit",
                training__save_every=2, training__eval_every=0, training__keep_last=100,
                training__threads=1, training__lr=1e-3)
    base.update(overrides)
    return write_config(path, tiny, out, **base)


def launch(config, nproc, *args, env=None, wait=True):
    cmd = [str(QLORA), "train", str(config), *args]
    if nproc:
        cmd += ["--nproc-per-node", str(nproc)]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    if not wait:
        return p
    out, err = p.communicate(timeout=900)
    p.stdout_text, p.stderr_text = out, err
    return p


def ok(p):
    assert p.returncode == 0, p.stderr_text[-4000:]
    return p


def adapter(out):
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def assert_close_runs(a, b, steps=None):
    la, lb = train_losses(a), train_losses(b)
    keys = steps or sorted(la)
    assert sorted(lb) == sorted(la) and keys
    for s in keys:
        assert la[s] == pytest.approx(lb[s], rel=1e-6, abs=1e-6), (s, la[s], lb[s])
    wa, wb = adapter(a), adapter(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")


def workers_of(launcher_pid):
    """{rank: pid} of a launcher's children."""
    kids = open(f"/proc/{launcher_pid}/task/{launcher_pid}/children").read().split()
    ranks = {}
    for pid in map(int, kids):
        env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
        rank = next(int(e[5:]) for e in env if e.startswith(b"RANK="))
        ranks[rank] = pid
    return ranks


def wait_for(path, proc, seconds=600):
    deadline = time.time() + seconds
    while not path.exists():
        assert proc.poll() is None and time.time() < deadline, f"ended before {path}"
        time.sleep(0.02)


def no_process_left(pids):
    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}") or \
            open(f"/proc/{pid}/stat").read().split()[2] == "Z", f"worker {pid} still running"


@pytest.fixture(scope="module")
def one_rank_big(tiny, data21, tmp_path_factory):
    root = tmp_path_factory.mktemp("one_big")
    ok(launch(dp_config(root / "c.yaml", tiny, data21, root / "out"), 0))
    return root / "out"


def test_two_ranks_equal_one_rank_with_twice_the_batch_and_with_accumulation(
        tiny, data21, one_rank_big, tmp_path):
    two = tmp_path / "two"
    p = ok(launch(dp_config(tmp_path / "two.yaml", tiny, data21, two,
                            training__micro_batch_size=2), 2))
    assert "data parallel: rank 0 of 2 over gloo (c10d)" in p.stderr_text
    assert "[rank 1] info" not in p.stderr_text  # rank 1 logs only warnings and errors
    accum = tmp_path / "accum"
    ok(launch(dp_config(tmp_path / "accum.yaml", tiny, data21, accum,
                        training__micro_batch_size=2, training__gradient_accumulation_steps=2), 0))
    assert sorted(train_losses(one_rank_big)) == list(range(1, 13))  # 2 epochs x 6 steps
    assert_close_runs(two, one_rank_big)
    assert_close_runs(accum, two)
    # Rank 0 alone wrote: one metrics file, one set of checkpoints, one adapter.
    assert sorted(x.name for x in two.iterdir() if x.name.startswith("checkpoint-")) == \
        sorted(x.name for x in one_rank_big.iterdir() if x.name.startswith("checkpoint-"))
    evals = [json.loads(l) for l in (two / "metrics.jsonl").read_text().splitlines()
             if "eval_loss" in l]
    evals_big = [json.loads(l) for l in (one_rank_big / "metrics.jsonl").read_text().splitlines()
                 if "eval_loss" in l]
    assert [e["eval_loss"] for e in evals] == pytest.approx([e["eval_loss"] for e in evals_big],
                                                           rel=1e-6)


def signal_rank_1_after(tmp_path, tiny, data21, out, checkpoint, sig, wait_seconds):
    """Starts 2 ranks, sends rank 1 `sig` once `checkpoint` exists; (elapsed, stderr, pids)."""
    cfg = dp_config(tmp_path / "c.yaml", tiny, data21, out, training__micro_batch_size=2,
                    training__distributed={"timeout_seconds": TIMEOUT})
    p = launch(cfg, 2, wait=False)
    wait_for(out / checkpoint / "trainer_state.json", p)
    ranks = workers_of(p.pid)
    os.kill(ranks[1], sig)
    t = time.time()
    _, err = p.communicate(timeout=wait_seconds)
    assert p.returncode != 0, err[-3000:]
    no_process_left(ranks.values())
    return time.time() - t, err


def test_sigkill_of_a_rank_fails_the_job_and_resume_continues_with_one_or_two_ranks(
        tiny, data21, one_rank_big, tmp_path):
    out = tmp_path / "out"
    elapsed, err = signal_rank_1_after(tmp_path, tiny, data21, out, "checkpoint-4",
                                       signal.SIGKILL, TIMEOUT + 60)
    assert elapsed < TIMEOUT + 15, (elapsed, err[-3000:])
    assert "worker rank 1" in err and "killed by signal 9" in err, err[-3000:]
    assert "rank 0 of 2" in err and "failed" in err, (elapsed, err[-3000:])
    # Resume from the last complete checkpoint, once with 1 rank x 2 accumulation steps
    # (the same 4 rows per step) and once with 2 ranks: both as the uninterrupted run.
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    cfg1 = dp_config(tmp_path / "c1.yaml", tiny, data21, out, training__micro_batch_size=2,
                     training__gradient_accumulation_steps=2)
    r1 = ok(launch(cfg1, 0))
    assert "resumed from" in r1.stderr_text
    assert_close_runs(out, one_rank_big)
    cfg2 = dp_config(tmp_path / "c2.yaml", tiny, data21, copy, training__micro_batch_size=2)
    ok(launch(cfg2, 2))
    assert_close_runs(copy, one_rank_big)


def test_a_hung_rank_fails_the_job_within_the_timeout(tiny, data21, tmp_path):
    elapsed, err = signal_rank_1_after(tmp_path, tiny, data21, tmp_path / "out", "checkpoint-2",
                                       signal.SIGSTOP, 3 * TIMEOUT + 60)
    assert elapsed < 2 * TIMEOUT + 30, (elapsed, err[-3000:])
    assert "rank 0 of 2" in err, err[-3000:]


def test_ctrl_c_on_the_launcher_stops_every_rank_at_one_step(tiny, data21, one_rank_big,
                                                             tmp_path):
    out = tmp_path / "out"
    cfg = dp_config(tmp_path / "c.yaml", tiny, data21, out, training__micro_batch_size=2)
    p = launch(cfg, 2, wait=False)
    wait_for(out / "checkpoint-4" / "trainer_state.json", p)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 130, err[-3000:]
    assert "interrupted by SIGINT: saved" in err, err[-3000:]
    ok(launch(cfg, 2))
    assert_close_runs(out, one_rank_big)


def listening_ports():
    """Local TCP ports in LISTEN state (IPv4 and IPv6)."""
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if os.path.exists(table):
            for line in open(table).read().splitlines()[1:]:
                f = line.split()
                if f[3] == "0A":
                    ports.add(int(f[1].rsplit(":", 1)[1], 16))
    return ports


def test_launcher_leaves_no_listener_or_worker_behind(tiny, data21, tmp_path):
    """Started and stopped again and again: the store's port is closed and the workers gone."""
    out = tmp_path / "out"
    cfg = dp_config(tmp_path / "c.yaml", tiny, data21, out, training__micro_batch_size=2,
                    training__epochs=1)
    for _ in range(3):
        shutil.rmtree(out, ignore_errors=True)
        p = ok(launch(cfg, 2))
        port = int(p.stderr_text.split("rendezvous at 127.0.0.1:")[1].split()[0])
        assert port not in listening_ports()
    assert not open(f"/proc/{os.getpid()}/task/{os.getpid()}/children").read().split()


def test_nccl_on_the_cpu_is_a_clear_error(tiny, data21, tmp_path):
    cfg = dp_config(tmp_path / "c.yaml", tiny, data21, tmp_path / "out",
                    training__distributed={"backend": "nccl"})
    p = launch(cfg, 1)
    assert p.returncode == 1
    assert "training.distributed.backend: nccl" in p.stderr_text, p.stderr_text[-2000:]


def test_resume_with_dropout_after_a_short_step_repeats_the_run(tiny, data21, tmp_path):
    """With dropout, a rank that had no rows on an epoch's last step drew fewer seeds; the
    ranks' generators are made equal again after every step, so resuming from a checkpoint
    after such a step (rank 0's generator state for all) repeats the run exactly."""
    a = tmp_path / "a"
    cfg = dp_config(tmp_path / "a.yaml", tiny, data21, a, training__micro_batch_size=2,
                    lora__dropout=0.1)
    ok(launch(cfg, 2))
    b = tmp_path / "b"
    shutil.copytree(a, b)
    for name in ["checkpoint-10", "checkpoint-12", "adapter"]:
        shutil.rmtree(b / name)
    ok(launch(dp_config(tmp_path / "b.yaml", tiny, data21, b, training__micro_batch_size=2,
                        lora__dropout=0.1), 2))
    la, lb = train_losses(a), train_losses(b)
    assert sorted(la) == sorted(lb) == list(range(1, 13))
    assert [lb[s] for s in range(9, 13)] == [la[s] for s in range(9, 13)]
    wa, wb = adapter(a), adapter(b)
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def summary(out):
    return json.loads((out / "summary.json").read_text())


def test_zero1_sharded_optimizer_trains_as_the_unsharded_one_with_half_the_state(
        tiny, data21, tmp_path):
    """shard_optimizer: each rank keeps the 8-bit state of its half of the LoRA parameters;
    the run is the unsharded run bit for bit (each parameter's update is the same arithmetic,
    done by its owner and broadcast)."""
    runs = {}
    for shard in (False, True):
        out = tmp_path / f"shard{int(shard)}"
        ok(launch(dp_config(tmp_path / f"s{int(shard)}.yaml", tiny, data21, out,
                            training__micro_batch_size=2, training__optimizer="paged_adamw_8bit",
                            training__distributed={"shard_optimizer": shard}), 2))
        runs[shard] = out
    assert train_losses(runs[True]) == train_losses(runs[False])
    wa, wb = adapter(runs[True]), adapter(runs[False])
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    full, half = summary(runs[False])["optimizer_state_bytes"], summary(runs[True])["optimizer_state_bytes"]
    assert 0.3 * full < half < 0.7 * full, (half, full)
    # The checkpoints hold the whole state either way.
    sizes = [(runs[s] / "checkpoint-12" / "optimizer.pt").stat().st_size for s in (True, False)]
    assert sizes[0] == sizes[1]


def test_zero1_checkpoint_resumes_with_one_or_two_ranks(tiny, data21, one_rank_big, tmp_path):
    out = tmp_path / "out"
    cfg = dp_config(tmp_path / "c.yaml", tiny, data21, out, training__micro_batch_size=2,
                    training__distributed={"shard_optimizer": True})
    p = launch(cfg, 2, wait=False)
    wait_for(out / "checkpoint-4" / "trainer_state.json", p)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 130, err[-3000:]
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    ok(launch(cfg, 2))  # sharded again
    assert_close_runs(out, one_rank_big)
    ok(launch(dp_config(tmp_path / "c1.yaml", tiny, data21, copy, training__micro_batch_size=2,
                        training__gradient_accumulation_steps=2), 0))  # one rank, unsharded
    assert_close_runs(copy, one_rank_big)
