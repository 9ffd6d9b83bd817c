"""The run folder: one process at a time, and what a resume puts in order.

- ``RunLock``: an exclusive ``fcntl.flock`` on ``DIR/.lock``, held for the life of the
  run. The kernel drops it when the process exits, however it exits (SIGKILL, OOM, a
  crash), so it can never go stale; a second process is refused with one line naming
  the holder (pid, host, start time) that the holder wrote into the file. The file
  itself is never deleted (deleting a lock file lets two processes lock two different
  files). flock works on local file systems; NFS and some network file systems do not
  honour it across machines.
- ``open_run_dir``: the checks of ``--out`` (a new or empty folder, or with resume a
  lens_fast run of the same model), taken again under the lock; removes the temporary
  files and folders (``.tmp-*``) a killed process left; ``run.json`` for a new run.
- ``tidy_for_resume``: truncates ``metrics.jsonl`` to the resumed step (a killed run
  logged steps that its last checkpoint does not hold; a torn last line goes too), and
  records the resume in ``run.json``: when, from which checkpoint, and every setting
  that differs from the run's previous settings.

Reusable by every recipe on the trainer; all of it runs on the main rank only.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import socket
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch

from lens_fast.atomic import TMP_PREFIX, write_json, write_text
from lens_fast.errors import CorruptFile, InvalidValue, OutputExists, RunFolderBusy, StorageError, storage_error

LOCK_NAME = ".lock"
# Folders (relative to the run folder) where the trainer writes through temporaries.
TEMP_HOMES = ("", "checkpoints", "samples", "export", os.path.join("export", "transformer"))


class RunLock:
    """An exclusive lock on ``run_dir`` for as long as this object (or the process) lives."""

    def __init__(self, run_dir: str):
        self.fd: Optional[int] = None
        self.path = os.path.join(run_dir, LOCK_NAME)
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise storage_error(f"cannot create the run folder lock {self.path}", e) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _read_holder(fd)
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunFolderBusy(f"run folder {run_dir} is in use by another training process ({holder}); "
                                    "wait for it to end or choose another --out") from None
            raise storage_error(f"cannot lock the run folder {run_dir}", e) from None
        self.fd, self.run_dir = fd, run_dir
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)

    def check(self) -> None:
        """The lock file is still the one this process locked: a run folder removed or
        replaced underneath (``rm -rf``, a sync tool) would let a second process lock a
        new file while this one writes on, so it is a ``StorageError``."""
        try:
            same = os.path.samestat(os.fstat(self.fd), os.stat(self.path))
        except OSError:
            same = False
        if not same:
            err = StorageError(f"run folder {self.run_dir} was removed or replaced while this run was using it; "
                               "stopping before writing into it (its last checkpoint is wherever the folder went)")
            err.errno = errno.ENOENT
            raise err

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor drops the flock
            self.fd = None

    def __del__(self):
        self.release()


def _read_holder(fd: int) -> str:
    """'pid P on host H, started T' from a lock file (what the holder wrote)."""
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(info["started"])))
        mine = " - this process: close the earlier Trainer first" if (
            info["pid"] == os.getpid() and info["host"] == socket.gethostname()) else ""
        return f"pid {info['pid']} on host {info['host']}, started {started}{mine}"
    except (ValueError, KeyError, TypeError, OSError):
        return "holder unknown"


# -- the checks of --out ------------------------------------------------------------------
def check_run_dir(out: str, resume: bool, model_config: dict) -> bool:
    """Refuse a folder holding other files unless resuming a lens_fast run of the same
    model. Returns True when the folder has to be initialised."""
    if not os.path.exists(out):
        return True
    if not os.path.isdir(out):
        raise OutputExists(f"--out {out} exists and is not a folder")
    names = sorted(n for n in os.listdir(out) if n != LOCK_NAME and not n.startswith(TMP_PREFIX))
    if not names:
        return True
    if not resume:
        raise OutputExists(f"--out {out} already holds files ({', '.join(names[:4])}"
                           f"{', ...' if len(names) > 4 else ''}); pass --resume to continue the run there, "
                           "or choose a new or empty folder")
    saved = read_run_json(out).get("model_config")
    if saved != json.loads(json.dumps(model_config)):
        diff = sorted(k for k in set(saved or {}) | set(model_config) if (saved or {}).get(k) != model_config.get(k))
        raise InvalidValue(f"--resume into {out}: its run trained a different model (keys {diff} differ); "
                           "use the same model config or a new --out")
    return False


def read_run_json(out: str) -> dict:
    path = os.path.join(out, "run.json")
    if not os.path.isfile(path):
        raise OutputExists(f"--out {out} holds files but no run.json: it is not a lens_fast training run, "
                           "refusing to write into it")
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
    except ValueError as e:
        raise CorruptFile(f"{path} is not valid JSON ({e}); it cannot be resumed") from None
    if not isinstance(record, dict):
        raise CorruptFile(f"{path} must hold a JSON object, got {type(record).__name__}")
    return record


def init_run_dir(out: str, cfg, model_config: dict, world: int, recipe: Optional[dict] = None) -> None:
    """Write ``run.json``: the config, the model config, the world size and the recipe's
    record (what a resume must match, e.g. the teacher's fingerprint)."""
    write_json(os.path.join(out, "run.json"), {"config": cfg.to_dict(), "model_config": model_config,
                                               "world": world, "created": time.time(), "torch": torch.__version__,
                                               "recipe": recipe or {"name": cfg.recipe}, "resumes": []})


def open_run_dir(out: str, resume: bool, cfg, model_config: dict, world: int, recipe: Optional[dict] = None,
                 check_resume: Optional[Callable[[Optional[dict]], None]] = None) -> Tuple[RunLock, bool, List[str]]:
    """Check ``out``, create and lock it, remove the temporaries a killed process left,
    check again under the lock (another process may have started or finished in
    between), and write ``run.json`` for a new run. Returns (the lock, whether the run
    is new, the temporaries removed)."""
    check_run_dir(out, resume, model_config)  # refuse a foreign folder before touching it
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise storage_error(f"cannot create the run folder --out {out}", e) from None
    lock = RunLock(out)
    try:
        fresh = check_run_dir(out, resume, model_config)
        if not fresh and check_resume is not None:
            check_resume(read_run_json(out).get("recipe"))
        removed = remove_stale_temporaries(out)
        if fresh:
            init_run_dir(out, cfg, model_config, world, recipe)
    except BaseException:
        lock.release()
        raise
    return lock, fresh, removed


# -- resume ---------------------------------------------------------------------------
def remove_stale_temporaries(run_dir: str) -> List[str]:
    """Remove the ``.tmp-*`` files and folders a killed run left (call under the lock);
    returns their paths relative to ``run_dir``."""
    removed = []
    for home in TEMP_HOMES:
        folder = os.path.join(run_dir, home)
        if not os.path.isdir(folder):
            continue
        for name in sorted(os.listdir(folder)):
            if not name.startswith(TMP_PREFIX):
                continue
            path = os.path.join(folder, name)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.remove(path)
            removed.append(os.path.join(home, name))
    return removed


def truncate_metrics(run_dir: str, step: int) -> int:
    """Keep the ``metrics.jsonl`` records up to ``step`` (the resumed checkpoint's):
    those after it are re-logged by the resumed run. Torn or invalid lines go too.
    Returns how many lines were dropped."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return 0
    kept, dropped = [], 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                record = json.loads(line)
                keep = isinstance(record, dict) and int(record.get("step", 0)) <= step
            except (ValueError, TypeError):
                keep = False
            if keep:
                kept.append(line if line.endswith("\n") else line + "\n")
            else:
                dropped += 1
    if dropped:
        write_text(path, "".join(kept))
    return dropped


def config_changes(old: dict, new: dict, prefix: str = "") -> Dict[str, list]:
    """{"section.key": [old, new]} for every leaf that differs between two config dicts."""
    out = {}
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        name = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            out.update(config_changes(a, b, name + "."))
        elif json.dumps(a, sort_keys=True, default=str) != json.dumps(b, sort_keys=True, default=str):
            out[name] = [a, b]
    return out


def tidy_for_resume(run_dir: str, step: int, checkpoint: Optional[str], cfg, world: int,
                    removed: List[str] = ()) -> dict:
    """Metrics truncated to ``step`` and the resume recorded in ``run.json`` (main rank,
    under the lock; ``removed``: the temporaries ``open_run_dir`` removed); returns the
    record appended to ``run.json``'s ``resumes``."""
    dropped = truncate_metrics(run_dir, step)
    record = read_run_json(run_dir)
    new_config = json.loads(json.dumps(cfg.to_dict(), default=str))
    changed = config_changes(record.get("config", {}), new_config)
    if record.get("world") != world:
        changed["world"] = [record.get("world"), world]
    if record.get("torch") != torch.__version__:
        changed["torch"] = [record.get("torch"), torch.__version__]
    entry = {"time": time.time(), "step": step, "checkpoint": checkpoint and os.path.relpath(checkpoint, run_dir),
             "pid": os.getpid(), "host": socket.gethostname(), "changed": changed,
             "removed_temporaries": list(removed), "metrics_lines_dropped": dropped}
    record.setdefault("resumes", []).append(entry)
    record.update(config=new_config, world=world, torch=torch.__version__)
    write_json(os.path.join(run_dir, "run.json"), record)
    with open(os.path.join(run_dir, "metrics.jsonl"), "a", encoding="utf-8") as f:
        f.write(json.dumps({"event": "resume", "step": step, "checkpoint": checkpoint}) + "\n")
    return entry
