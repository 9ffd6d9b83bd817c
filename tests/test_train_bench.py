"""bench/train_step.py and bench/distill_step.py: the GPU benchmarks' CPU dry runs (CI)."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_train_step_bench_dry_run_writes_its_json(tmp_path):
    out = tmp_path / "train_step.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "train_step.py"), "--dry-run", "--out",
                           str(out)], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("train_step cpu layers=2")
    r = json.loads(out.read_text())
    assert r["dry_run"] and r["device"] == "cpu" and r["mfu_vs_datasheet"] is None
    assert r["step_ms_median"] > 0 and r["tflops"] > 0 and r["model_tflop_per_step"] > 0
    assert len(r["first_steps_s"]) == 2 and r["final_loss"] > 0


def test_distill_step_bench_dry_run_writes_its_json(tmp_path):
    out = tmp_path / "distill_step.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "distill_step.py"), "--dry-run", "--out",
                           str(out)], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("distill_step cpu layers=2")
    r = json.loads(out.read_text())
    assert r["dry_run"] and r["device"] == "cpu" and r["fake_updates"] == 2
    # 2 fake updates (simulation 1.5 + image 1 + forward/backward 3) + the student's 1.5 + 3 + teacher 3 + fake 1
    assert r["forwards_per_update"] == 19.5
    assert r["update_ms_median"] > 0 and r["tflops"] > 0 and r["model_tflop_per_update"] > 0
    assert len(r["first_steps_s"]) == 2 and r["final_loss"] >= 0
