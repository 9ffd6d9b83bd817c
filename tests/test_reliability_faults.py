"""Fault injection on everything the trainer writes: a disk that fills up in the middle
of a write (OSError ENOSPC from the write itself), files and folders that vanish while
being written, a rename that fails. Each must stop with one clear StorageError, leave
the earlier checkpoints and outputs as they were, leave no temporary behind, and let
``--resume`` carry on once the cause is gone."""
import contextlib
import errno
import json
import os
import shutil

import pytest
import torch.distributed.checkpoint.filesystem as dcp_fs
from PIL import Image

import lens_fast.atomic as atomic
from lens_fast.errors import StorageError
from lens_fast.models import loading
from lens_fast.train import Trainer, load_config
from lens_fast.train import checkpoint, metrics
from lens_fast.train.checkpoint import latest_checkpoint
from lens_fast.train.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


class FullDisk:
    """A writable stream that takes ``room`` more bytes, then fails like a full disk."""

    def __init__(self, stream, room):
        self.stream, self.room = stream, room

    def write(self, data):
        data = memoryview(data).cast("B") if not isinstance(data, str) else data
        if len(data) > self.room:
            self.stream.write(data[:self.room])
            self.room = 0
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= len(data)
        return self.stream.write(data)

    def __getattr__(self, name):
        return getattr(self.stream, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stream.close()


def full_disk_open(room=10):
    """``open`` whose files in write/append mode run out of space after ``room`` bytes."""
    def fake(path, mode="r", *args, **kwargs):
        f = open(path, mode, *args, **kwargs)
        return FullDisk(f, room) if any(c in mode for c in "wa") else f
    return fake


def tiny(**overrides):
    cfg = load_config("tiny-cpu")
    cfg.override(["logging.progress_bar=false", "checkpoint.every=2"] + [f"{k}={v}" for k, v in overrides.items()])
    return cfg


def temporaries(run_dir):
    return [os.path.join(d, n) for d, dirs, files in os.walk(run_dir) for n in dirs + files if n.startswith(".tmp-")]


def fail_at_step_4_then_resume(tmp_path, inject, match, **overrides):
    """Train to 2 (a checkpoint), inject the fault, train on: the checkpoint at 4 must
    fail cleanly; then without the fault a resumed run continues from 2 to 6."""
    out = str(tmp_path / "run")
    trainer = Trainer(tiny(**overrides), out_dir=out)
    trainer.train(max_steps=2)
    with inject(), pytest.raises(StorageError, match=match) as info:
        trainer.train(max_steps=6)
    trainer.close()
    assert "\n" not in str(info.value)
    assert latest_checkpoint(out)[0] == 2 and temporaries(out) == []
    assert not os.path.exists(os.path.join(out, "checkpoints", "step_4"))
    with Trainer(tiny(**overrides), out_dir=out, resume=True) as again:
        assert again.step == 2
        assert again.train(max_steps=6).step == 6
    assert latest_checkpoint(out)[0] == 6 and temporaries(out) == []
    return info.value


def test_disk_full_while_writing_the_checkpoint_shards(tmp_path, monkeypatch):
    real = dcp_fs.FileSystem.create_stream

    @contextlib.contextmanager
    def create_stream(self, path, mode):
        with real(self, path, mode) as stream:
            yield FullDisk(stream, 1000) if "step_4" in str(path) and "w" in mode else stream

    def inject():
        return _patched(monkeypatch, dcp_fs.FileSystem, "create_stream", create_stream)
    err = fail_at_step_4_then_resume(tmp_path, inject, r"writing checkpoint step_4 into .*checkpoints failed: "
                                                       r".*No space left on device.*earlier checkpoints are intact")
    assert err.errno == errno.ENOSPC


@contextlib.contextmanager
def _patched(monkeypatch, owner, name, value):
    with monkeypatch.context() as m:
        m.setattr(owner, name, value, raising=False)
        yield


@pytest.mark.parametrize("room", [0, 30])  # nothing written / a torn JSON
def test_disk_full_while_writing_the_rank_state_and_marker(tmp_path, monkeypatch, room):
    fail_at_step_4_then_resume(tmp_path, lambda: _patched(monkeypatch, checkpoint, "open", full_disk_open(room)),
                               "step_4 .*No space left on device")


def test_the_checkpoint_folder_vanishing_mid_write(tmp_path, monkeypatch):
    real = checkpoint.dcp.save

    def save_then_vanish(state, storage_writer):
        real(state, storage_writer=storage_writer)
        if "step_4" in str(storage_writer.path):  # e.g. a cleanup job removes it
            shutil.rmtree(storage_writer.path)
    fail_at_step_4_then_resume(tmp_path, lambda: _patched(monkeypatch, checkpoint.dcp, "save", save_then_vanish),
                               "removed by another process while it was being written")


def test_a_failing_rename_leaves_no_half_checkpoint(tmp_path, monkeypatch):
    real = os.rename

    def rename(a, b):
        if a.endswith(".tmp-step_4"):
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        return real(a, b)
    fail_at_step_4_then_resume(tmp_path, lambda: _patched(monkeypatch, checkpoint.os, "rename", rename),
                               "Invalid cross-device link")


def test_the_run_folder_removed_underneath_stops_the_run(tmp_path):
    out = tmp_path / "run"
    trainer = Trainer(tiny(), out_dir=str(out))
    trainer.train(max_steps=1)
    shutil.move(str(out), str(tmp_path / "moved"))  # what rm -rf or a sync tool does, seen from here
    with pytest.raises(StorageError, match="was removed or replaced while this run was using it"):
        trainer.train(max_steps=4)
    trainer.close()
    assert not out.exists()  # nothing was re-created in its place


def test_disk_full_while_appending_metrics(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    argv = ["--config", "tiny-cpu", "--out", str(out), "--max-steps", "3", "--no-progress"]
    with monkeypatch.context() as m:
        m.setattr(metrics, "open", full_disk_open(5), raising=False)
        assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot append to" in err[0] and "metrics.jsonl" in err[0] and "No space" in err[0]
    assert main(argv[:4] + ["--max-steps", "6", "--no-progress", "--resume"]) == 0  # space again: it resumes
    steps = [json.loads(line).get("step") for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 6 and steps.count(6) == 1


def test_disk_full_while_exporting_keeps_the_previous_export(tmp_path, monkeypatch):
    out = tmp_path / "run"
    with Trainer(tiny(), out_dir=str(out)) as trainer:
        trainer.train(max_steps=2)
        weights = out / "export" / "transformer" / "diffusion_pytorch_model.safetensors"
        before = weights.read_bytes()

        def save_file(tensors, path, metadata=None):
            with open(path, "wb") as f:
                f.write(b"x" * 100)
            raise OSError(errno.ENOSPC, "No space left on device")
        with monkeypatch.context() as m:
            m.setattr(loading, "save_file", save_file)
            with pytest.raises(StorageError, match=r"cannot write .*export/transformer: .*No space left"):
                trainer.train(max_steps=4)
    assert weights.read_bytes() == before and temporaries(str(out)) == []


@pytest.mark.parametrize("fault", ["full", "vanish"])
def test_atomic_writes_never_leave_a_torn_or_missing_target(tmp_path, monkeypatch, fault):
    target = tmp_path / "report.json"
    atomic.write_json(str(target), {"old": True})
    real = atomic.os.replace

    def replace(src, dst):
        os.remove(src)  # the temporary vanished (another process, a tmp cleaner)
        return real(src, dst)
    with monkeypatch.context() as m:
        if fault == "full":
            m.setattr(atomic.os, "fdopen", lambda fd, mode: FullDisk(open(fd, mode), 7))
        else:
            m.setattr(atomic.os, "replace", replace)
        with pytest.raises(StorageError, match=r"cannot write .*report\.json"):
            atomic.write_json(str(target), {"new": list(range(100))})
    assert json.loads(target.read_text()) == {"old": True} and os.listdir(tmp_path) == ["report.json"]
    with monkeypatch.context() as m:
        m.setattr(atomic.os, "fdopen", lambda fd, mode: FullDisk(open(fd, mode), 50))
        with pytest.raises(StorageError):
            atomic.save_image(Image.new("RGB", (64, 64)), str(tmp_path / "img.png"))
    assert os.listdir(tmp_path) == ["report.json"]


def test_atomic_writes_get_the_permissions_open_would_give(tmp_path):
    """mkstemp makes 0600 files; a written output must be readable as a plain open() would
    leave it (0666 less the umask), e.g. by the group that shares a run folder."""
    from lens_fast.atomic import write_text

    mask = os.umask(0o022)
    os.umask(mask)
    write_text(str(tmp_path / "a.json"), "{}")
    with open(tmp_path / "b.json", "w") as f:
        f.write("{}")
    assert os.stat(tmp_path / "a.json").st_mode & 0o777 == os.stat(tmp_path / "b.json").st_mode & 0o777 == 0o666 & ~mask
