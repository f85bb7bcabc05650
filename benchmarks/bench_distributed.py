"""Data parallelism on this machine: `qlora train` of the demo config (SmolLM2-135M re-quantised to NF4,
r 16, micro-batch 8 x 2 accumulation) for a few steps as 1 rank x 2 threads against 2 ranks
x 1 thread (c10d Gloo over 127.0.0.1, the same global batch), with the all-reduce time per
step each rank reports (time waiting in collectives after backward: what the overlap did not
hide).

    .venv/bin/python benchmarks/bench_distributed.py [--steps 10]

Needs `make build` and the demo data (`make demo` makes it). Record the table in RESULTS.md
with the CPU it names.
"""
import argparse
import json
import os
import pathlib
import subprocess
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from bench_7b import cpu_name  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
QLORA = REPO / "build" / "tools" / "qlora"
OUT = REPO / "build" / "bench_distributed"


def run(name, steps, nproc, threads, micro, accum):
    out = OUT / name
    sets = [f"training.max_steps={steps}", f"training.micro_batch_size={micro}",
            f"training.gradient_accumulation_steps={accum}", "training.eval_every=0",
            "training.save_every=0", f"training.threads={threads}", "generation.prompts=[]",
            "data.eval_max_examples=8", f"output_dir={out}", "resume=none",
            "model.base_format=requantize"]  # NF4, as recorded in RESULTS.md
    cmd = [str(QLORA), "train", str(REPO / "configs" / "demo.yaml")]
    for s in sets:
        cmd += ["--set", s]
    if nproc > 1:
        cmd += ["--nproc-per-node", str(nproc)]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        raise SystemExit(f"{name} failed:\n{p.stderr[-3000:]}")
    return json.loads((out / "summary.json").read_text())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args()
    print(f"CPU: {cpu_name()}; {os.cpu_count()} cores; {args.steps} steps of 16 sequences")
    rows = [("1 rank x 2 threads (micro 8 x 2 accumulation)", run("one", args.steps, 1, 2, 8, 2)),
            ("2 ranks x 1 thread (micro 8 x 1 accumulation)", run("two", args.steps, 2, 1, 8, 1))]
    print(f"{'run':<50}{'tokens/s':>10}{'all-reduce s/step':>20}{'peak RSS':>12}")
    for name, s in rows:
        comm = s.get("communication_seconds_per_step", 0.0)
        print(f"{name:<50}{s['tokens_per_second']:>10.1f}{comm:>20.4f}"
              f"{s['peak_rss_bytes'] / 2**20:>9.0f} MiB")
    print(f"ratio 2 ranks / 1 rank: {rows[1][1]['tokens_per_second'] / rows[0][1]['tokens_per_second']:.2f}")


if __name__ == "__main__":
    main()
