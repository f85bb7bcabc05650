"""The faults a long fine-tune meets, through `qlora train` on a tiny random LLaMA:
SIGINT / SIGTERM (a checkpoint at the next step boundary, exit 130 / 143, bit-identical
resume; a second signal exits at once), a full disk, a read-only and a vanished output
folder while checkpointing (the error names the path, the previous checkpoint stays
intact, no partial file under a final name), bad data deep in a file (named by file and
line, per data.strict), and a NaN gradient from one batch (skipped: the adapter equals a
run that never saw that batch)."""
import json
import os
import re
import shutil
import signal
import subprocess
import time

import pytest
import torch
from safetensors.torch import load_file

from test_trainer_cli import QLORA, WORDS, tiny, train_losses, write_config  # noqa: F401

STEPS = 24  # long enough that a signal sent after checkpoint-4 lands mid-run


def train(config, check=True, env=None):
    res = subprocess.run([str(QLORA), "train", str(config)], capture_output=True, timeout=600,
                         env=env)
    res.stdout = res.stdout.decode(errors="replace")
    res.stderr = res.stderr.decode(errors="replace")
    if check:
        assert res.returncode == 0, res.stderr[-3000:]
    return res


def adapter(out):
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def assert_same_adapter(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def assert_final_names_complete(out):
    """Every checkpoint folder under its final name is complete (a temporary one may be left
    where the process could not remove it: killed at once, a read-only file system)."""
    for ckpt in out.glob("checkpoint-*"):
        assert (ckpt / "trainer_state.json").exists(), ckpt
        assert (ckpt / "optimizer.pt").exists() and (ckpt / "adapter").is_dir(), ckpt


def assert_nothing_partial(out):
    """No temporary folder or file left, and every checkpoint folder complete."""
    for root, dirs, files in os.walk(out):
        for name in dirs + files:
            assert ".tmp" not in name, os.path.join(root, name)
    assert_final_names_complete(out)


def config_for(tmp_path, tiny, out, name="run.yaml", **overrides):
    base = {"training__max_steps": STEPS, "training__save_every": 2, "training__keep_last": 100,
            "training__eval_every": 0}
    base.update(overrides)
    return write_config(tmp_path / name, tiny, out, **base)


@pytest.fixture(scope="module")
def straight(tiny, tmp_path_factory):
    """The uninterrupted run every interrupted one must reproduce."""
    root = tmp_path_factory.mktemp("straight")
    out = root / "out"
    train(config_for(root, tiny, out))
    return out


def wait_for_checkpoint(proc, out, step):
    deadline = time.time() + 300
    while not (out / f"checkpoint-{step}" / "trainer_state.json").exists():
        assert proc.poll() is None and time.time() < deadline, f"run ended before checkpoint-{step}"
        time.sleep(0.01)


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_saves_a_checkpoint_and_resume_is_bit_identical(tiny, straight, tmp_path, sig,
                                                               code):
    out = tmp_path / "out"
    config = config_for(tmp_path, tiny, out)
    err = tmp_path / "stderr.txt"
    with open(err, "wb") as f:
        proc = subprocess.Popen([str(QLORA), "train", str(config)], stdout=subprocess.DEVNULL,
                                stderr=f)
        wait_for_checkpoint(proc, out, 4)
        proc.send_signal(sig)
        assert proc.wait(timeout=300) == code
    text = err.read_text(errors="replace")
    name = signal.Signals(sig).name
    m = re.search(rf"qlora: interrupted by {name}: saved (\S+/checkpoint-(\d+)); run again with "
                  r"resume: auto", text)
    assert m, text[-3000:]
    step = int(m.group(2))
    assert 4 <= step < STEPS, "the run must stop at the next step boundary, not at the end"
    assert m.group(1) == str(out / f"checkpoint-{step}")
    assert_nothing_partial(out)
    assert not (out / "adapter").exists(), "an interrupted run has no final adapter"

    res = train(config)
    assert f"resumed from {out}/checkpoint-{step} at step {step}" in res.stderr
    assert train_losses(out) == train_losses(straight)
    assert_same_adapter(adapter(out), adapter(straight))


def test_a_second_signal_exits_at_once_and_loses_at_most_the_last_step(tiny, straight,
                                                                       tmp_path):
    out = tmp_path / "out"
    config = config_for(tmp_path, tiny, out)
    proc = subprocess.Popen([str(QLORA), "train", str(config)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    wait_for_checkpoint(proc, out, 4)
    # Two different signals, so the kernel cannot merge them into one, sent while the run
    # is stopped: both are pending together, so no step or save can end between them.
    proc.send_signal(signal.SIGSTOP)
    proc.send_signal(signal.SIGTERM)
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGCONT)
    _, stderr = proc.communicate(timeout=300)
    stderr = stderr.decode(errors="replace")
    assert proc.returncode in (130, 143), stderr[-3000:]
    assert "stop requested" in stderr
    assert "qlora: interrupted by" not in stderr, "the second signal must not wait for a save"
    # Stopped in the middle of a save, the run leaves its temporary folder (the next save
    # removes it); what carries a final name is complete.
    assert_final_names_complete(out)
    res = train(config)
    assert "resumed from" in res.stderr
    assert train_losses(out) == train_losses(straight)
    assert_same_adapter(adapter(out), adapter(straight))


def unshare_prefix():
    """A private mount namespace (as root or as a user mapped to root)."""
    cmd = ["unshare", "--user", "--map-root-user", "--mount"]
    if shutil.which("unshare") is None or subprocess.run(cmd + ["true"]).returncode != 0:
        pytest.skip("unshare --user --mount is not permitted here: no private tmpfs")
    return cmd


def pages(path):
    """What a folder's files take on a tmpfs, in bytes (whole pages per file)."""
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            total += -(-os.path.getsize(os.path.join(root, f)) // 4096) * 4096
    return total


def run_in_namespace(tmp_path, script):
    sh = tmp_path / "in_namespace.sh"
    sh.write_text("set -eu\n" + script)
    res = subprocess.run(unshare_prefix() + ["bash", str(sh)], capture_output=True, text=True,
                         timeout=900)
    assert res.returncode == 0, res.stdout + res.stderr


def test_disk_full_while_checkpointing_names_it_and_keeps_the_last_one(tiny, straight,
                                                                       tmp_path):
    # Room for the logs and about two and a half checkpoints: the third one fails.
    checkpoint = pages(straight / "checkpoint-2")
    logs = sum(-(-f.stat().st_size // 4096) * 4096 for f in straight.iterdir() if f.is_file())
    size_kib = (logs + 5 * checkpoint // 2) // 1024
    mnt, copy = tmp_path / "small_disk", tmp_path / "copy"
    mnt.mkdir()
    config = config_for(tmp_path, tiny, mnt / "out")
    run_in_namespace(tmp_path, f"""
mount -t tmpfs -o size={size_kib}k tmpfs {mnt}
set +e
{QLORA} train {config} 2> {tmp_path}/stderr.txt
echo $? > {tmp_path}/rc.txt
set -e
cp -a {mnt}/out {copy}
""")
    text = (tmp_path / "stderr.txt").read_text(errors="replace")
    assert (tmp_path / "rc.txt").read_text().strip() == "1", text[-3000:]
    m = re.search(r"cannot save checkpoint (\S+)/checkpoint-(\d+): .*No space left on device.*"
                  r"the last complete checkpoint, \S+/checkpoint-(\d+), is intact", text)
    assert m, text[-3000:]
    assert m.group(1) == str(mnt / "out")
    failed, intact = int(m.group(2)), int(m.group(3))
    assert intact == failed - 2 and intact >= 2
    assert_nothing_partial(copy)
    assert not (copy / f"checkpoint-{failed}").exists()
    # Once there is room again, the run continues from the intact checkpoint exactly.
    config = config_for(tmp_path, tiny, copy, name="resume.yaml")
    res = train(config)
    assert f"resumed from {copy}/checkpoint-{intact}" in res.stderr
    assert train_losses(copy) == train_losses(straight)
    assert_same_adapter(adapter(copy), adapter(straight))


def test_read_only_output_folder_mid_run_is_a_clear_error(tiny, tmp_path):
    mnt = tmp_path / "disk"
    mnt.mkdir()
    out = mnt / "out"
    config = config_for(tmp_path, tiny, out)
    run_in_namespace(tmp_path, f"""
mount -t tmpfs tmpfs {mnt}
mkdir {out}
(set +e; {QLORA} train {config} 2> {tmp_path}/stderr.txt; echo $? > {tmp_path}/rc.txt) &
while [ ! -f {out}/checkpoint-2/trainer_state.json ]; do sleep 0.01; done
# A fresh read-only bind over the folder: the run's open files stay on the
# writable mount below (remounting that one is refused while they are open).
mount --bind {out} {out}
mount -o remount,ro,bind {out}
wait
cp -a {out} {tmp_path}/copy
""")
    text = (tmp_path / "stderr.txt").read_text(errors="replace")
    assert (tmp_path / "rc.txt").read_text().strip() == "1", text[-3000:]
    m = re.search(rf"cannot save checkpoint {out}/checkpoint-(\d+): .*Read-only file system.*"
                  rf"the last complete checkpoint, {out}/checkpoint-(\d+), is intact", text)
    assert m, text[-3000:]
    assert int(m.group(2)) >= 2
    # The temporary folder of the refused save cannot be removed on a read-only folder.
    assert_final_names_complete(tmp_path / "copy")


def test_output_folder_deleted_mid_run_is_recreated_and_the_run_saved(tiny, tmp_path):
    out = tmp_path / "out"
    config = config_for(tmp_path, tiny, out)
    proc = subprocess.Popen([str(QLORA), "train", str(config)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    wait_for_checkpoint(proc, out, 2)
    # Renamed away first, so the folder goes at once, even in the middle of a
    # save (which then saves again); removing it file by file would race the
    # trainer's next write.
    gone = tmp_path / "out-deleted"
    out.rename(gone)
    shutil.rmtree(gone)
    _, stderr = proc.communicate(timeout=300)
    stderr = stderr.decode(errors="replace")
    assert proc.returncode == 0, stderr[-3000:]
    assert f"the output folder {out} has disappeared since training started" in stderr
    # The log file is opened again in the new folder, the warning first.
    assert "has disappeared since training started" in (out / "train.log").read_text()
    assert (out / f"checkpoint-{STEPS}" / "trainer_state.json").exists()
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    assert_nothing_partial(out)


def test_file_size_limit_on_export_names_the_file_and_leaves_nothing(tiny, straight, tmp_path):
    """ulimit -f: the write fails with EFBIG instead of the process dying of SIGXFSZ."""
    out = tmp_path / "merged.gguf"
    config = config_for(tmp_path, tiny, tmp_path / "unused")
    res = subprocess.run(["prlimit", "--fsize=65536", str(QLORA), "export", str(config),
                          "--adapter", str(straight / "adapter"), "--format", "gguf",
                          "--outtype", "f32", "--out", str(out)], capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 1, res.stderr
    assert str(out) in res.stderr and "File too large" in res.stderr, res.stderr
    assert list(tmp_path.glob("merged.gguf*")) == []


# --- bad data deep in a file ---------------------------------------------------------------

def data_file(tmp_path, bad_line, bad):
    lines = []
    for i in range(5000):
        w = WORDS[i % len(WORDS)]
        lines.append(json.dumps({"instruction": f"Define \"{w}\" ({i}).", "input": "",
                                 "output": f"{w}: a thing called {w}."}).encode())
    lines[bad_line - 1] = bad
    path = tmp_path / "big.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


BAD_LINES = {
    "malformed": b'{"instruction": "Define", "output": "x"',
    "invalid_utf8": b'{"instruction": "Define \xff\xfe", "input": "", "output": "x"}',
    "empty_output": b'{"instruction": "Define", "input": "", "output": ""}',
}


@pytest.mark.parametrize("kind", sorted(BAD_LINES))
def test_bad_line_5000_lines_in_is_named_strict_refuses_lenient_skips(tiny, tmp_path, kind):
    data = data_file(tmp_path, 4999, BAD_LINES[kind])
    out = tmp_path / "strict"
    config = config_for(tmp_path, tiny, out, data={"train": str(data), "eval_split": 0.01,
                                                   "max_length": 64, "strict": True},
                        training__max_steps=2)
    res = train(config, check=False)
    assert res.returncode == 1, res.stderr[-3000:]
    assert f"{data}:4999" in res.stderr, res.stderr[-3000:]
    assert not out.exists(), "a refused start writes nothing"

    out = tmp_path / "lenient"
    config = config_for(tmp_path, tiny, out, name="lenient.yaml",
                        data={"train": str(data), "eval_split": 0.01, "max_length": 64,
                              "strict": False}, training__max_steps=2)
    res = train(config)
    assert f"{data}:4999" in res.stderr, res.stderr[-3000:]
    assert (out / "adapter" / "adapter_model.safetensors").exists()


def test_example_longer_than_max_length_is_truncated_and_counted(tiny, tmp_path):
    long = json.dumps({"instruction": "Define " + " ".join(WORDS * 20), "input": "",
                       "output": "a word."}).encode()
    data = data_file(tmp_path, 2500, long)
    out = tmp_path / "out"
    config = config_for(tmp_path, tiny, out, data={"train": str(data), "eval_split": 0.01,
                                                   "max_length": 200, "strict": True},
                        training__max_steps=2)
    res = train(config)
    assert f"{data}: 1 of 5000 examples longer than data.max_length (200 tokens) truncated" \
        in res.stderr, res.stderr[-3000:]


# --- a NaN gradient from one batch ----------------------------------------------------------

def test_nan_gradient_step_is_skipped_and_the_adapter_equals_a_run_without_that_batch(
        tiny, tmp_path):
    """File order, constant LR, no dropout: the only difference between the two runs is the
    batch of step 3, which one run sees with a NaN gradient and the other never sees."""
    records = tiny["records"]
    micro, accum, bad_step, steps = 2, 2, 3, 8
    per_step = micro * accum
    train_all = tmp_path / "all.jsonl"
    train_all.write_text("".join(json.dumps(r) + "\n" for r in records[:per_step * steps]))
    kept = records[:per_step * (bad_step - 1)] + records[per_step * bad_step:per_step * steps]
    train_without = tmp_path / "without.jsonl"
    train_without.write_text("".join(json.dumps(r) + "\n" for r in kept))
    evals = tmp_path / "eval.jsonl"
    evals.write_text("".join(json.dumps(r) + "\n" for r in records[-4:]))

    def cfg(name, data, max_steps):
        return write_config(
            tmp_path / f"{name}.yaml", tiny, tmp_path / name,
            lora={"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["all-linear"]},
            data={"train": str(data), "eval": str(evals), "max_length": 64, "shuffle": False},
            training__max_steps=max_steps, training__micro_batch_size=micro,
            training__gradient_accumulation_steps=accum, training__scheduler="constant",
            training__warmup_steps=0, training__save_every=0, training__eval_every=0)

    tool = os.environ.get("QLORA_BAD_BATCH_TOOL")
    if not tool:
        pytest.skip("QLORA_BAD_BATCH_TOOL not set (run through ctest)")
    res = subprocess.run([tool, str(cfg("bad", train_all, steps)), str(bad_step)],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads(res.stdout)
    assert summary["steps"] == steps and summary["skipped_steps"] == 1
    assert f"step {bad_step}: non-finite loss/gradient, update skipped" in res.stderr

    train(cfg("without", train_without, steps - 1))
    assert_same_adapter(adapter(tmp_path / "bad"), adapter(tmp_path / "without"))
