"""The trainer across processes: two ranks under torchrun (gloo, FSDP2 on CPU) match one
process with the same global batch, and a run killed with SIGKILL resumes to the same
weights as an uninterrupted one. Each run is a subprocess with a time limit."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from lens_fast.train.checkpoint import latest_checkpoint, load_checkpoint_weights

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TRAIN = ["-m", "lens_fast.train", "--config", "tiny-cpu", "--no-progress"]


def run(args, timeout=120):
    proc = subprocess.run(args, env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def losses(run_dir):
    out = {}
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            if "loss" in r:
                out[r["step"]] = r["loss"]  # the last record of a step wins (a resumed run re-logs)
    return out


def export(run_dir):
    return load_file(os.path.join(run_dir, "export", "transformer", "diffusion_pytorch_model.safetensors"))


def test_two_ranks_under_torchrun_match_one_process_with_the_same_global_batch(tmp_path):
    # A sample grid at step 3 (EMA weights swapped into the sharded model and back) must
    # not disturb the steps after it.
    steps = ["--max-steps", "6", "--set", "checkpoint.every=3", "--set", "logging.sample_every=3"]
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *TRAIN,
         "--out", str(tmp_path / "two"), *steps], timeout=180)
    # One process, two micro-batches: data ranks 0 and 1 of the same global batch.
    run([sys.executable, *TRAIN, "--out", str(tmp_path / "one"), *steps, "--set", "train.grad_accum=2"])
    l2, l1 = losses(tmp_path / "two"), losses(tmp_path / "one")
    assert sorted(l2) == list(range(1, 7))
    for s in l1:
        assert l2[s] == pytest.approx(l1[s], rel=1e-5, abs=1e-6)
    assert l1[6] < l1[1]
    with open(tmp_path / "two" / "checkpoints" / "step_6" / "complete.json") as f:
        assert json.load(f)["world"] == 2
    for which in ("model", "ema"):  # the 2-rank checkpoint is sharded; read in one process
        a = load_checkpoint_weights(str(tmp_path / "one" / "checkpoints" / "step_6"), which)
        b = load_checkpoint_weights(str(tmp_path / "two" / "checkpoints" / "step_6"), which)
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)
    e1, e2 = export(tmp_path / "one"), export(tmp_path / "two")
    for k in e1:
        torch.testing.assert_close(e2[k], e1[k], rtol=1e-4, atol=1e-5)
    grids = [np.asarray(Image.open(tmp_path / r / "samples" / "step_0000003.png"), dtype=np.int16)
             for r in ("one", "two")]
    assert grids[0].shape == grids[1].shape and np.abs(grids[0] - grids[1]).max() <= 2


def test_sigkill_mid_run_then_resume_gives_the_uninterrupted_weights(tmp_path):
    final = 12
    common = ["--set", "checkpoint.every=2", "--set", "logging.every=1"]
    run([sys.executable, *TRAIN, "--out", str(tmp_path / "ref"), "--max-steps", str(final), *common])
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, *TRAIN, "--out", str(killed), "--max-steps", "1000", *common],
                            env=ENV, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 90
    try:
        while not os.path.isdir(killed / "checkpoints" / "step_4"):
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.time() < deadline, "no checkpoint within 90 s"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    step, _ = latest_checkpoint(str(killed))
    assert 4 <= step < final, f"the run got to step {step} before the kill; the test needs it mid-way"
    assert not os.path.isdir(killed / "export")  # it never finished
    # Same command line, --resume: continues from the latest complete checkpoint.
    proc = run([sys.executable, *TRAIN, "--out", str(killed), "--max-steps", str(final), "--resume", *common])
    assert f"step {final}" in proc.stdout
    for which in ("model", "ema"):
        a = load_checkpoint_weights(str(tmp_path / "ref" / "checkpoints" / f"step_{final}"), which)
        b = load_checkpoint_weights(str(killed / "checkpoints" / f"step_{final}"), which)
        assert all(torch.equal(a[k], b[k]) for k in a), which
    e1, e2 = export(tmp_path / "ref"), export(killed)
    assert all(torch.equal(e1[k], e2[k]) for k in e1)
    assert losses(killed) == losses(tmp_path / "ref")
    with open(killed / "metrics.jsonl") as f:
        assert any(json.loads(line).get("event") == "resume" for line in f)
