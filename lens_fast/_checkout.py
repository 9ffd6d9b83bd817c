"""What a source checkout's top-level ``kernels/`` and ``train/`` do when imported by
their bare names.

Both folders are packages of lens_fast (``lens_fast.kernels``, ``lens_fast.train``; setup.py
maps them, nothing installs them at the top level). But ``python -m pytest`` and a Python
started in the checkout put the checkout's root first on ``sys.path``, where
``import kernels`` would find the folder before Hugging Face's ``kernels`` package (which
transformers imports). So each folder's ``__init__.py`` starts with::

    if __name__ != "lens_fast.<folder>":   # imported by the bare name
        runpy.run_path(<this file>)["hand_over"](__name__, __file__)

and ``hand_over`` loads the installed package of that name in the folder's place, or, when
nothing else provides the name, leaves an empty namespace package, exactly what Python makes
of a plain folder on ``sys.path`` (no ``__file__``, no contents), which availability probes
such as transformers' ``is_kernels_available`` read as "not installed". This file imports nothing
from lens_fast and is run by path, so it works before (and without) lens_fast's own import.
``tests/test_no_shadowing.py`` checks every top-level folder against every installed
distribution.
"""
import importlib.machinery
import importlib.util
import os
import sys


def hand_over(name: str, init_file: str) -> None:
    """Replace ``sys.modules[name]`` (the checkout folder being imported) with the module
    that ``name`` resolves to when the checkout's root is not on ``sys.path``."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(init_file)))
    elsewhere = [p for p in sys.path if os.path.abspath(p or os.curdir) != root]
    ours = sys.modules.pop(name)
    saved = sys.path[:]
    sys.path[:] = elsewhere
    try:
        spec = importlib.util.find_spec(name)
    finally:
        sys.path[:] = saved
    if spec is None or spec.origin == ours.__spec__.origin:
        spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
        spec.submodule_search_locations = []
        sys.modules[name] = importlib.util.module_from_spec(spec)
        return
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
