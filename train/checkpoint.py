"""Training checkpoints and exports.

``DIR/checkpoints/step_N/`` holds a torch.distributed.checkpoint (model, EMA, optimizer
moments and step, sharded: any world size can read it) stored as safetensors, one
``shard-*.safetensors`` file per writing rank with its shards' offsets in the header
(torch's HuggingFaceStorageWriter/Reader: nothing is pickled, nothing is unpickled),
``rank_state/rank_R.json`` per rank (RNG states of torch, CUDA, numpy and python, the
data position, counters) and ``complete.json``. The optimizer's hyper-parameters are
not stored: a resumed run takes them from its (possibly changed) config, and
``run.json`` records what changed. A checkpoint is written into
``checkpoints/.tmp-step_N`` and renamed when every rank is done, so a ``step_N`` folder
is always complete; ``latest_checkpoint`` takes the newest one with ``complete.json``.
A failed write (disk full, a file removed underneath) raises ``StorageError`` on every
rank and leaves the earlier checkpoints as they were. Checkpoint folders must be on a
file system all ranks share (as torch.distributed.checkpoint requires).
"""
from __future__ import annotations

import base64
import contextlib
import json
import os
import random
import re
import shutil
import time
import warnings
from typing import Dict, Optional, Tuple

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from safetensors import SafetensorError
from torch.distributed.checkpoint import HuggingFaceStorageReader, HuggingFaceStorageWriter

from lens_fast.atomic import write_json
from lens_fast.errors import CorruptFile, InvalidValue, MissingFile, StorageError, one_line
from lens_fast.models.transformer import LensTransformer2DModel

from .parallel import all_ranks_ok

MARKER = "complete.json"
EXPORT_MARKER = "exported.json"  # beside export/transformer: the step it holds
WRITER = "lens_fast.train"


@contextlib.contextmanager
def _single_process_quiet():
    """DCP warns on every call without a process group; one process is intended here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def checkpoint_dir(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints")


def list_checkpoints(run_dir: str):
    """[(step, path)] of complete checkpoints, oldest first."""
    root = checkpoint_dir(run_dir)
    if not os.path.isdir(root):
        return []
    out = []
    for name in os.listdir(root):
        m = re.fullmatch(r"step_(\d+)", name)
        if m and os.path.isfile(os.path.join(root, name, MARKER)):
            out.append((int(m.group(1)), os.path.join(root, name)))
    return sorted(out)


def latest_checkpoint(run_dir: str) -> Optional[Tuple[int, str]]:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


# -- RNG states ------------------------------------------------------------------------
def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode()


def _unb64(s: str) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(base64.b64decode(s), dtype=np.uint8).copy())


def rng_state() -> dict:
    np_state = np.random.get_state()
    py_state = random.getstate()
    state = {"torch": _b64(torch.get_rng_state()),
             "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
             "python": [py_state[0], list(py_state[1]), py_state[2]]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = _b64(torch.cuda.get_rng_state())
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(_unb64(state["torch"]))
    n = state["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    p = state["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(_unb64(state["cuda"]))


# -- save / load -------------------------------------------------------------------------
def _write_json_synced(path: str, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())


def save_checkpoint(run_dir: str, step: int, state: Dict, rank_state: dict, rank: int, world: int,
                    keep_last: Optional[int] = None) -> Optional[str]:
    """Write ``step_N`` atomically (collective: every rank calls it; each phase ends in
    an all-reduce of "did it work here", which is also the barrier between phases).
    Returns the path, or None when a complete ``step_N`` exists already. A failed write
    raises ``StorageError`` on every rank (never a rank left waiting for the others)."""
    _check_tensors_only(state)
    root = checkpoint_dir(run_dir)
    final = os.path.join(root, f"step_{step}")
    if os.path.isfile(os.path.join(final, MARKER)):
        return None
    tmp = os.path.join(root, f".tmp-step_{step}")

    def prepare():
        if rank == 0:
            os.makedirs(root, exist_ok=True)
            if os.path.isdir(tmp):  # left by a run of this folder killed while saving
                shutil.rmtree(tmp)
            os.makedirs(os.path.join(tmp, "rank_state"))

    def write():
        with _single_process_quiet():
            dcp.save(state, storage_writer=HuggingFaceStorageWriter(tmp, save_distributed=True))
        _write_json_synced(os.path.join(tmp, "rank_state", f"rank_{rank:05d}.json"), rank_state)

    def publish():
        if rank != 0:
            return
        _write_json_synced(os.path.join(tmp, MARKER), {"writer": WRITER, "step": step, "world": world,
                                                       "time": time.time()})
        if os.path.isdir(final):  # an incomplete step_N cannot be made by this code; keep it aside
            os.rename(final, final + f".incomplete-{int(time.time())}")
        os.rename(tmp, final)
        if keep_last:
            for _, old in list_checkpoints(run_dir)[:-keep_last]:
                with open(os.path.join(old, MARKER), encoding="utf-8") as f:
                    if json.load(f).get("writer") == WRITER:
                        shutil.rmtree(old)

    for phase in (prepare, write, publish):
        _on_every_rank(phase, rank, world, tmp, f"writing checkpoint step_{step} into {root} failed")
    return final


def _on_every_rank(phase, rank: int, world: int, tmp: str, what: str) -> None:
    """Run one phase of a save on this rank; when it failed on any rank, rank 0 removes
    the temporary folder and every rank raises ``StorageError`` (none is left waiting)."""
    error: Optional[BaseException] = None
    try:
        phase()
    except dcp.api.CheckpointException as e:  # raised on every rank when any rank failed
        if not isinstance(_cause(e), OSError):
            raise
        error = _cause(e)
    except OSError as e:
        error = e
    if all_ranks_ok(error is None, world):
        return
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    if error is None:
        raise StorageError(f"{what} on another rank (see its error); the earlier checkpoints are intact")
    hint = "; the earlier checkpoints are intact: fix the cause (free space, permissions) and rerun with --resume"
    if isinstance(error, FileNotFoundError):
        hint = " (removed by another process while it was being written?)" + hint
    err = StorageError(f"{what}: {one_line(error)}{hint}")
    err.errno = getattr(error, "errno", None)
    raise err


def _check_tensors_only(state, prefix: str = "") -> None:
    """Every leaf is a tensor: anything else would be pickled into the checkpoint."""
    for key, value in state.items():
        if isinstance(value, dict):
            _check_tensors_only(value, f"{prefix}{key}.")
        elif not isinstance(value, torch.Tensor):
            raise TypeError(f"checkpoint state {prefix}{key} is a {type(value).__name__}; checkpoints hold tensors "
                            "only (safetensors), put other values in rank_state")


def _cause(e: BaseException) -> BaseException:
    """The first rank's exception inside a CheckpointException (else ``e``)."""
    if isinstance(e, dcp.api.CheckpointException) and e.failures:
        return next(iter(e.failures.values()))[0]
    return e


def _reader(path: str) -> HuggingFaceStorageReader:
    """A safetensors reader for a checkpoint folder; refuses the old pickle format."""
    names = os.listdir(path)
    if not any(n.endswith(".safetensors") for n in names):
        if ".metadata" in names:
            raise CorruptFile(f"checkpoint {path} is in torch.distributed.checkpoint's pickle format (written by an "
                              "older lens_fast); lens_fast reads safetensors checkpoints only and never unpickles")
        raise CorruptFile(f"checkpoint {path} holds no safetensors shard; move it aside to resume from the one "
                          "before it")
    return HuggingFaceStorageReader(path)


def _load(state: Dict, path: str) -> None:
    try:
        with _single_process_quiet():
            dcp.load(state, storage_reader=_reader(path))
    except (dcp.api.CheckpointException, OSError, RuntimeError, SafetensorError, KeyError, AssertionError) as e:
        raise CorruptFile(f"checkpoint {path} cannot be read ({one_line(_cause(e))[:300]}); move it aside to "
                          "resume from the one before it") from None


def load_checkpoint(path: str, state: Dict, rank: int) -> dict:
    """Fill ``state`` in place from a checkpoint; return this rank's rank_state."""
    _load(state, path)
    rs = os.path.join(path, "rank_state", f"rank_{rank:05d}.json")
    if not os.path.isfile(rs):
        with open(os.path.join(path, MARKER), encoding="utf-8") as f:
            world = json.load(f).get("world")
        raise InvalidValue(f"{path} was written by {world} ranks and has no state for rank {rank}; resume with "
                           f"the same number of ranks (the data position is per rank)")
    try:
        with open(rs, encoding="utf-8") as f:
            return json.load(f)
    except ValueError as e:
        raise CorruptFile(f"{rs} is not valid JSON ({e}); move {path} aside to resume from the checkpoint "
                          "before it") from None


def saved_keys(path: str) -> set:
    """The flattened state-dict keys a checkpoint holds."""
    try:
        return set(_reader(path).read_metadata().state_dict_metadata)
    except (SafetensorError, OSError, ValueError) as e:
        raise CorruptFile(f"checkpoint {path} cannot be read ({one_line(e)}); move it aside to resume from the "
                          "one before it") from None


def read_run_config(run_dir: str) -> dict:
    path = os.path.join(run_dir, "run.json")
    if not os.path.isfile(path):
        raise MissingFile(f"{run_dir} has no run.json; it is not a lens_fast training run")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def load_checkpoint_weights(path: str, which: str = "model", model_config: Optional[dict] = None
                            ) -> Dict[str, torch.Tensor]:
    """Full float32 weights ("model" or "ema") of a training checkpoint, read in one
    process without a process group (any number of ranks wrote it)."""
    if which not in ("model", "ema"):
        raise InvalidValue(f"which={which!r}: expected 'model' or 'ema'")
    if model_config is None:
        model_config = read_run_config(os.path.dirname(os.path.dirname(os.path.abspath(path))))["model_config"]
    model = LensTransformer2DModel(**model_config)
    sd = {k: torch.zeros_like(v, dtype=torch.float32) for k, v in model.state_dict().items()}
    _load({which: sd}, path)
    return sd


def exported_step(run_dir: str) -> Optional[int]:
    """The step whose weights ``DIR/export/transformer`` holds (None: no export yet)."""
    try:
        with open(os.path.join(run_dir, "export", EXPORT_MARKER), encoding="utf-8") as f:
            return int(json.load(f)["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def mark_exported(run_dir: str, step: int) -> None:
    write_json(os.path.join(run_dir, "export", EXPORT_MARKER), {"step": step, "time": time.time()})


def export_transformer(folder: str, model_config: dict, state_dict: Dict[str, torch.Tensor],
                       overwrite: bool = False) -> str:
    """Write a diffusers-format ``transformer`` folder that
    ``LensTransformer2DModel.from_pretrained`` loads."""
    with torch.device("meta"):
        shell = LensTransformer2DModel(**model_config)
    shell.save_pretrained(folder, state_dict=state_dict, overwrite=overwrite)
    return folder
