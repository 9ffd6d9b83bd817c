"""Reliability of the run folder: one process at a time (an OS lock that dies with its
process), resumes that tidy what a killed run left (temporaries, metrics logged after
the checkpoint) and record what changed, and a trainer killed with SIGKILL at every
kind of point that resumes to the weights of an uninterrupted run."""
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from lens_fast.errors import CorruptFile, RunFolderBusy
from lens_fast.train import Trainer, load_config
from lens_fast.train.cli import main
from lens_fast.train.run_dir import LOCK_NAME, RunLock, config_changes, truncate_metrics

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
QUIET = ["--no-progress", "--set", "logging.every=1"]


def tiny(**overrides):
    cfg = load_config("tiny-cpu")
    cfg.override(["logging.progress_bar=false"] + [f"{k}={v}" for k, v in overrides.items()])
    return cfg


def records(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def run_json(run_dir):
    with open(os.path.join(run_dir, "run.json")) as f:
        return json.load(f)


def temporaries(run_dir):
    return sorted(os.path.relpath(os.path.join(d, n), run_dir) for d, dirs, files in os.walk(run_dir)
                  for n in dirs + files if n.startswith(".tmp-"))


# -- one process per run folder --------------------------------------------------------------
def test_a_second_trainer_on_the_same_folder_is_refused_naming_the_holder(tmp_path):
    out = str(tmp_path / "run")
    first = Trainer(tiny(), out_dir=out)
    before = sorted(os.listdir(out))
    with pytest.raises(RunFolderBusy) as info:
        Trainer(tiny(), out_dir=out, resume=True)
    msg = str(info.value)
    assert f"pid {os.getpid()} on host {socket.gethostname()}, started 20" in msg
    assert "this process: close the earlier Trainer first" in msg and "\n" not in msg
    assert sorted(os.listdir(out)) == before  # the refused one touched nothing
    first.close()
    with Trainer(tiny(), out_dir=out, resume=True) as again:  # released by close(); a context manager too
        assert again.train(max_steps=2).step == 2
    with Trainer(tiny(), out_dir=out, resume=True):
        pass


HOLD = textwrap.dedent("""
    import sys, time
    from lens_fast.train.run_dir import RunLock
    lock = RunLock(sys.argv[1])
    print("locked", flush=True)
    time.sleep(120)
""")


def test_another_process_holding_the_folder_is_named_and_its_lock_dies_with_it(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["--config", "tiny-cpu", "--out", str(out), "--max-steps", "2", *QUIET]) == 0
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        metrics = (out / "metrics.jsonl").read_bytes()
        assert main(["--config", "tiny-cpu", "--out", str(out), "--resume", "--max-steps", "4", *QUIET]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "is in use by another training process" in err[0], err
        assert f"pid {holder.pid} on host {socket.gethostname()}" in err[0]
        assert (out / "metrics.jsonl").read_bytes() == metrics
        os.kill(holder.pid, signal.SIGKILL)  # no cleanup code runs: the kernel drops the flock
        holder.wait(timeout=30)
    finally:
        holder.kill()
        holder.wait()
    assert main(["--config", "tiny-cpu", "--out", str(out), "--resume", "--max-steps", "4", *QUIET]) == 0
    assert [r["step"] for r in records(out) if "loss" in r] == [1, 2, 3, 4]


def test_the_lock_file_is_kept_and_reused_and_a_torn_one_still_locks(tmp_path):
    lock = RunLock(str(tmp_path))
    lock.release()
    (tmp_path / LOCK_NAME).write_text("garbage")  # e.g. a holder killed while writing its line
    lock = RunLock(str(tmp_path))
    info = json.loads((tmp_path / LOCK_NAME).read_text())
    assert info["pid"] == os.getpid()
    fd = os.open(tmp_path / LOCK_NAME, os.O_RDWR)
    os.pwrite(fd, b"{not json", 0)
    with pytest.raises(RunFolderBusy, match="holder unknown"):
        RunLock(str(tmp_path))
    os.close(fd)
    lock.release()


# -- resume: what it tidies and records ----------------------------------------------------
def test_resume_removes_stale_temporaries_truncates_metrics_and_records_what_changed(tmp_path, caplog):
    out = str(tmp_path / "run")
    with Trainer(tiny(**{"checkpoint.every": 2}), out_dir=out) as t:
        t.train(max_steps=5)
    # What a run killed after step 5 (last checkpoint at 4) leaves behind:
    import shutil
    shutil.rmtree(os.path.join(out, "checkpoints", "step_5"))
    shutil.rmtree(os.path.join(out, "export"))
    os.makedirs(os.path.join(out, "checkpoints", ".tmp-step_6", "rank_state"))
    for name in (".tmp-run.json.abc", os.path.join("samples", ".tmp-step_0000006.png.x"),
                 os.path.join("export", "transformer", ".tmp-save-xyz", "f")):
        os.makedirs(os.path.dirname(os.path.join(out, name)), exist_ok=True)
        open(os.path.join(out, name), "w").close()
    open(os.path.join(out, "notes-tmp.txt"), "w").write("mine")  # not ours: kept
    with open(os.path.join(out, "metrics.jsonl"), "a") as f:
        f.write('{"step": 6, "loss": 0.1')  # torn by the kill
    caplog.set_level(logging.INFO, logger="lens_fast.train")
    with Trainer(tiny(**{"checkpoint.every": 2, "optim.lr": 0.001}), out_dir=out, resume=True) as t:
        assert t.step == 4
        t.train(max_steps=6)
    assert temporaries(out) == [] and open(os.path.join(out, "notes-tmp.txt")).read() == "mine"
    steps = [r["step"] for r in records(out) if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert [r.get("event") for r in records(out)].count("resume") == 1
    resume = run_json(out)["resumes"][-1]
    assert resume["step"] == 4 and resume["checkpoint"] == os.path.join("checkpoints", "step_4")
    assert resume["changed"] == {"optim.lr": [0.002, 0.001]}
    assert resume["metrics_lines_dropped"] == 2  # step 5 and the torn line
    assert set(resume["removed_temporaries"]) == {".tmp-run.json.abc", os.path.join("checkpoints", ".tmp-step_6"),
                                                  os.path.join("samples", ".tmp-step_0000006.png.x"),
                                                  os.path.join("export", "transformer", ".tmp-save-xyz")}
    assert run_json(out)["config"]["optim"]["lr"] == 0.001  # run.json now holds the settings in force
    assert "resumed" in caplog.text


def test_resume_without_a_checkpoint_says_so(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="lens_fast.train")
    with Trainer(tiny(), out_dir=str(tmp_path / "new"), resume=True) as t:
        assert t.step == 0
    assert "holds no run yet; starting a new run there" in caplog.text
    with Trainer(tiny(**{"checkpoint.every": 100}), out_dir=str(tmp_path / "early")) as t:
        t.train(max_steps=0)
    caplog.clear()
    with Trainer(tiny(), out_dir=str(tmp_path / "early"), resume=True) as t:
        assert t.step == 0
    assert "has no complete checkpoint" in caplog.text and "starting from step 0" in caplog.text
    assert run_json(tmp_path / "early")["resumes"][-1]["checkpoint"] is None


def test_unreadable_checkpoints_and_run_json_are_one_line_errors(tmp_path):
    out = tmp_path / "run"
    with Trainer(tiny(), out_dir=str(out)) as t:
        t.train(max_steps=2)
    ckpt = out / "checkpoints" / "step_2"
    shard = next(p for p in ckpt.iterdir() if p.suffix == ".safetensors")
    data = shard.read_bytes()
    shard.write_bytes(data[:len(data) // 2])
    with pytest.raises(CorruptFile, match=r"checkpoint .*step_2 cannot be read .*move it aside"):
        Trainer(tiny(), out_dir=str(out), resume=True)
    shard.unlink()
    (ckpt / ".metadata").write_bytes(b"\x80\x04pickle")  # the format of older versions
    with pytest.raises(CorruptFile, match="pickle format .* never unpickles"):
        Trainer(tiny(), out_dir=str(out), resume=True)
    (out / "run.json").write_text("{")
    with pytest.raises(CorruptFile, match=r"run\.json is not valid JSON"):
        Trainer(tiny(), out_dir=str(out), resume=True)


def test_metrics_truncation_and_config_changes_units(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"event": "resume", "step": 1}\n{"step": 2}\n[1]\n{"step": 3}\n{"st')
    assert truncate_metrics(str(tmp_path), 2) == 3
    assert path.read_text() == '{"step": 1}\n{"event": "resume", "step": 1}\n{"step": 2}\n'
    assert truncate_metrics(str(tmp_path / "none"), 2) == 0
    assert config_changes({"a": {"b": 1, "c": [1]}, "d": 1}, {"a": {"b": 2, "c": [1]}, "e": 3}) == \
        {"a.b": [1, 2], "d": [1, None], "e": [None, 3]}


# -- kill -9 at every kind of point, then resume -------------------------------------------
DRIVER = textwrap.dedent("""
    # The trainer CLI, killed with SIGKILL at one chosen point (test harness, not library code).
    import os, signal, sys
    point, at = sys.argv[1], int(sys.argv[2])

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    import lens_fast.atomic as atomic
    from lens_fast.models import loading
    from lens_fast.train import checkpoint, metrics, trainer

    def patch(owner, name, wrap):
        setattr(owner, name, wrap(getattr(owner, name)))

    if point == "run_json":  # while the new run's run.json is written: its temporary half done
        def half(f):
            def write(path, w):
                tmp = os.path.join(os.path.dirname(path), ".tmp-" + os.path.basename(path) + ".killed")
                with open(tmp, "wb") as fh:
                    fh.write(b'{"config": ')
                die()
            return write
        patch(atomic, "atomic_write", half)
    elif point == "between_steps":  # after step `at`, before its checkpoint
        patch(trainer.Trainer, "maybe_checkpoint", lambda f: lambda self, final=False: (
            die() if self.step == at else f(self, final)))
    elif point == "rank_state":  # checkpoint data written, its rank state not
        patch(checkpoint, "_write_json_synced", lambda f: lambda path, obj: (
            die() if "rank_state" in path and f".tmp-step_{at}" in path else f(path, obj)))
    elif point == "before_rename":  # checkpoint complete in .tmp-step_N, not yet renamed
        patch(checkpoint.os, "rename", lambda f: lambda a, b: (die() if a.endswith(f".tmp-step_{at}") else f(a, b)))
    elif point == "torn_metrics":  # half of step `at`'s metrics line written
        def torn(f):
            def event(self, record):
                if record.get("step") == at and "loss" in record:
                    with open(self.path, "a") as fh:
                        fh.write(f'{{"step": {at}, "lo')
                    die()
                f(self, record)
            return event
        patch(metrics.MetricsLogger, "event", torn)
    elif point == "export":  # inside the final export, files half moved in
        patch(loading, "_fill_folder", lambda f: lambda target, tmp, *a: (f(target, tmp, *a), die()))
    from lens_fast.train.cli import main
    sys.exit(main(sys.argv[3:]))
""")
FINAL = 10
KILLS = [("run_json", 0), ("between_steps", 3), ("rank_state", 4), ("torn_metrics", 5), ("before_rename", 8),
         ("export", FINAL)]


def test_sigkill_at_every_kind_of_point_then_resume_gives_the_uninterrupted_run(tmp_path):
    args = ["--config", "tiny-cpu", "--max-steps", str(FINAL), "--set", "checkpoint.every=2", *QUIET]
    ref = str(tmp_path / "ref")
    assert main([*args, "--out", ref]) == 0
    out = str(tmp_path / "killed")
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    for point, at in KILLS:
        proc = subprocess.run([sys.executable, str(driver), point, str(at), *args, "--out", out, "--resume"],
                              env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert proc.returncode == -signal.SIGKILL, (point, proc.stdout[-2000:], proc.stderr[-2000:])
    assert main([*args, "--out", out, "--resume"]) == 0  # the re-queued job, finally left alone
    exported = [load_file(os.path.join(r, "export", "transformer", "diffusion_pytorch_model.safetensors"))
                for r in (ref, out)]
    assert exported[0].keys() == exported[1].keys()
    assert all(torch.equal(exported[0][k], exported[1][k]) for k in exported[0])
    losses = {r["step"]: r["loss"] for r in records(ref) if "loss" in r}
    got = [(r["step"], r["loss"]) for r in records(out) if "loss" in r]
    assert got == sorted(losses.items())  # every step once, in order, with the uninterrupted losses
    assert temporaries(out) == []
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == [f"step_{s}" for s in (10, 2, 4, 6, 8)]
    # The relaunch after the run_json kill found no run yet (a new run); each later one
    # resumed from the last complete checkpoint: 2 (killed at 3), 2 (killed writing 4's
    # rank state), 4 (killed mid-line at 5), 6 (killed before renaming 8), 10 (in the export).
    assert [r["step"] for r in run_json(out)["resumes"]] == [2, 2, 4, 6, 10]


def test_train_checkpoint_resume_and_export_never_unpickle(tmp_path, monkeypatch):
    import pickle

    def refuse(*args, **kwargs):
        raise AssertionError("something was unpickled")
    for owner, name in ((pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load")):
        monkeypatch.setattr(owner, name, refuse)
    out = str(tmp_path / "run")
    with Trainer(tiny(**{"checkpoint.every": 2}), out_dir=out) as t:
        t.train(max_steps=3)
    with Trainer(tiny(), out_dir=out, resume=True) as t:
        assert t.step == 3 and t.train(max_steps=4).step == 4
    from lens_fast.models.transformer import LensTransformer2DModel
    from lens_fast.train.checkpoint import load_checkpoint_weights
    LensTransformer2DModel.from_pretrained(os.path.join(out, "export", "transformer"))
    assert load_checkpoint_weights(os.path.join(out, "checkpoints", "step_4"), "ema")
