"""No top-level folder of the checkout shadows an installed package.

``python -m pytest`` and a Python started in the checkout put its root first on
``sys.path``. Each test here runs a fresh interpreter in the root, as a user would, so
what it sees is what they see (the importing test process itself has the root on its path
only when pytest was started with ``python -m``)."""
import importlib.metadata
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOP_LEVEL = sorted(d for d in os.listdir(ROOT)
                   if os.path.isdir(os.path.join(ROOT, d)) and d.isidentifier() and not d.startswith((".", "_")))

PROBE = r"""
import importlib, json, sys
out = {}
for name in sys.argv[1:]:
    try:
        m = importlib.import_module(name)
        out[name] = {"file": getattr(m, "__file__", None), "path": list(getattr(m, "__path__", []) or []),
                     "names": sorted(k for k in vars(m) if not k.startswith("_"))}
    except ImportError as e:
        out[name] = {"error": str(e)}
print(json.dumps(out))
"""


def probe_from_root(names, *flags):
    run = subprocess.run([sys.executable, *flags, "-c", PROBE, *names], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def inside_checkout(path):
    """Whether ``path`` lies in one of the checkout's own top-level folders (a virtual
    environment kept inside the checkout, as `make` does, is not one of them)."""
    if path is None:
        return False
    real = os.path.realpath(path)
    return any(real == os.path.realpath(os.path.join(ROOT, d)) or
               real.startswith(os.path.realpath(os.path.join(ROOT, d)) + os.sep) for d in TOP_LEVEL)


def test_top_level_folders_listed():
    assert {"lens_fast", "kernels", "train", "tests", "bench", "csrc"} <= set(TOP_LEVEL)


def test_no_top_level_folder_shadows_an_installed_distribution():
    owners = importlib.metadata.packages_distributions()
    owned = [d for d in TOP_LEVEL if d != "lens_fast" and d in owners]
    if not owned:
        pytest.skip(f"no installed distribution owns any of {TOP_LEVEL}")
    seen = probe_from_root(owned)
    for name in owned:
        got = seen[name]
        assert "error" not in got, f"import {name} from the checkout root failed: {got['error']}"
        assert not inside_checkout(got["file"]), (
            f"`import {name}` in {ROOT} gives the checkout's {name}/ ({got['file']}) instead of the one "
            f"installed by {owners[name]}")
        assert not any(inside_checkout(p) for p in got["path"]), got


def test_kernels_and_train_import_only_under_lens_fast():
    seen = probe_from_root(["kernels", "train", "lens_fast.kernels", "lens_fast.train"])
    assert seen["lens_fast.kernels"]["file"] == os.path.join(ROOT, "kernels", "__init__.py")
    assert seen["lens_fast.train"]["file"] == os.path.join(ROOT, "train", "__init__.py")
    assert "Trainer" in seen["lens_fast.train"]["names"]
    for bare in ("kernels", "train"):
        got = seen[bare]
        if "error" in got:
            continue
        assert not inside_checkout(got["file"]) and not any(inside_checkout(p) for p in got["path"]), got
        assert "Trainer" not in got["names"] and "flash_attention" not in got["names"], got


def test_without_site_packages_bare_names_are_empty_namespaces():
    # `python -S`: nothing installed is visible, so nothing else provides `kernels` or `train`;
    # the folders must then look like plain folders (what probes read as "not installed").
    seen = probe_from_root(["kernels", "train"], "-S")
    for bare in ("kernels", "train"):
        assert seen[bare].get("file") is None and seen[bare]["path"] == [] and seen[bare]["names"] == [], seen


def test_installing_lens_fast_adds_no_top_level_name_but_lens_fast():
    script = ("import json, setuptools, runpy\n"
              "setuptools.setup = lambda **kw: print(json.dumps(kw['packages']))\n"
              "runpy.run_path('setup.py', run_name='__main__')\n")
    run = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "LENS_FAST_SKIP_CUDA_BUILD": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    packages = json.loads(run.stdout.strip().splitlines()[-1])
    assert {p.split(".")[0] for p in packages} == {"lens_fast"}, packages
    assert {"lens_fast.kernels", "lens_fast.train"} <= set(packages)


def test_transformers_kernel_integration_imports_from_the_checkout_root():
    probe = ("import importlib.util, sys\n"
             "if importlib.util.find_spec('transformers.integrations.hub_kernels') is None: sys.exit(3)\n"
             "import transformers.integrations.hub_kernels as h\n"
             "from transformers.utils import is_kernels_available\n"
             "import kernels\n"
             "print(kernels.__file__, is_kernels_available())\n")
    run = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=300)
    if run.returncode == 3:
        pytest.skip("this transformers has no hub_kernels integration")
    assert run.returncode == 0, run.stderr[-3000:]
    kernels_file = run.stdout.split()[0]
    if kernels_file != "None":
        assert not inside_checkout(kernels_file), run.stdout
