"""Checks of command-line values and output paths, run before any model loads.

``OneLineParser`` reports a bad option as one line (``PROG: error: argument --x: ...``)
and exit status 2; ``integer`` and ``number`` are argparse types that refuse non-finite
and out-of-range values where they are parsed. ``check_output_file`` /
``check_output_folder`` find every problem an output path can have (a folder where a
file is wanted, an existing file without ``--overwrite``, a parent that is a file or
cannot be written) before the run spends any time, by writing and removing a probe file
where the output will go.
"""
from __future__ import annotations

import argparse
import importlib
import math
import os
import tempfile
from typing import Optional

from .errors import InvalidValue, MissingFile, OutputExists


class OneLineParser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage dump) and exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _describe(lo, hi, kind: str) -> str:
    if lo is not None and hi is not None:
        return f"{kind} in [{lo}, {hi}]"
    if lo is not None:
        return f"{kind} >= {lo}"
    return f"{kind} <= {hi}" if hi is not None else kind


def integer(lo: Optional[int] = None, hi: Optional[int] = None):
    """argparse type: an integer in [lo, hi]."""
    def parse(text: str) -> int:
        try:
            v = int(text, 10)
        except ValueError:
            v = None
        if v is None or (lo is not None and v < lo) or (hi is not None and v > hi):
            raise argparse.ArgumentTypeError(f"expected an {_describe(lo, hi, 'integer')}, got {text!r}")
        return v
    parse.__name__ = "integer"
    return parse


def number(lo: Optional[float] = None, hi: Optional[float] = None, lo_open: bool = False):
    """argparse type: a finite number in [lo, hi] ((lo, hi] with ``lo_open``)."""
    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            v = math.nan
        bad = (not math.isfinite(v) or (lo is not None and (v <= lo if lo_open else v < lo))
               or (hi is not None and v > hi))
        if bad:
            want = f"a finite number > {lo}" + (f" and <= {hi}" if hi is not None else "") if lo_open \
                else "a finite " + _describe(lo, hi, "number")
            raise argparse.ArgumentTypeError(f"expected {want}, got {text!r}")
        return v
    parse.__name__ = "number"
    return parse


def load_named(spec: str, what: str):
    """The object ``package.module:name`` names (a user's reward, rewriter, metric factory),
    or ``InvalidValue`` starting with ``what`` (the option and its value) and saying why."""
    module, sep, attr = spec.partition(":")
    if not sep or not module or not attr:
        raise InvalidValue(f"{what}: expected 'package.module:name'")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError, ValueError) as e:
        raise InvalidValue(f"{what}: cannot load {attr!r} from {module!r} ({e})") from None


def check_device(flag: str, value: Optional[str]) -> None:
    """Refuse a device string torch cannot parse, or a CUDA device this machine lacks."""
    if value is None:
        return
    import torch

    try:
        dev = torch.device(value)
    except (RuntimeError, ValueError):
        raise InvalidValue(f"{flag} {value!r}: expected cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InvalidValue(f"{flag} {value}: this machine has no usable CUDA device; use {flag} cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InvalidValue(f"{flag} {value}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type != "cpu":
        raise InvalidValue(f"{flag} {value!r}: expected cpu, cuda or cuda:N")


def check_writable_folder(folder: str, flag: str) -> None:
    """``folder`` (or, when it does not exist yet, its nearest existing ancestor, where
    it will be created) is a folder this process can create files in."""
    probe_dir = os.path.abspath(folder)
    while not os.path.exists(probe_dir):
        parent = os.path.dirname(probe_dir)
        if parent == probe_dir:
            break
        probe_dir = parent
    if not os.path.isdir(probe_dir):
        raise InvalidValue(f"{flag} {folder}: {probe_dir} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".lens-fast-write-test-", dir=probe_dir)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise InvalidValue(f"{flag} {folder}: cannot create files in {probe_dir} "
                           f"({e.strerror or e})") from None


def check_output_file(path: str, flag: str, overwrite: bool = False) -> None:
    """``path`` can be written as a new file (or replaced, with ``overwrite``)."""
    if os.path.isdir(path):
        raise InvalidValue(f"{flag} {path} is a folder; expected a file name")
    if os.path.lexists(path):
        if not overwrite:
            raise OutputExists(f"{flag} {path} already exists; pass --overwrite to replace it")
        if not os.path.isfile(path):
            raise InvalidValue(f"{flag} {path} exists and is not a regular file; refusing to replace it")
    check_writable_folder(os.path.dirname(os.path.abspath(path)), flag)


def check_output_folder(path: str, flag: str, allow: tuple = ()) -> None:
    """``path`` is a new or empty folder (names in ``allow`` do not count) that can be
    created and written."""
    if os.path.lexists(path) and not os.path.isdir(path):
        raise InvalidValue(f"{flag} {path} exists and is not a folder")
    if os.path.isdir(path):
        names = sorted(n for n in os.listdir(path) if n not in allow)
        if names:
            raise OutputExists(f"{flag} {path} is not empty ({', '.join(names[:4])}"
                               f"{', ...' if len(names) > 4 else ''}); choose a new or empty folder "
                               "(nothing is overwritten)")
    check_writable_folder(path, flag)


def check_input_file(path: str, flag: str) -> None:
    """``path`` is an existing, readable regular file."""
    if not os.path.exists(path):
        raise MissingFile(f"{flag} {path} does not exist")
    if not os.path.isfile(path):
        raise InvalidValue(f"{flag} {path} is not a file")
    if not os.access(path, os.R_OK):
        raise InvalidValue(f"{flag} {path} is not readable (permission denied)")


def quiet_loaders() -> None:
    """No progress bars from transformers / diffusers while they load weights (the
    ``--quiet`` / ``--no-progress`` flags)."""
    for name in ("transformers", "diffusers"):
        try:
            module = __import__(f"{name}.utils.logging", fromlist=["disable_progress_bar"])
        except ImportError:
            continue
        module.disable_progress_bar()
