"""Run diffusers' own Lens tests against diffusers' classes and against lens_fast's.

diffusers' Lens implementation (a pull-request branch, commit d004842010 of
huggingface/diffusers) adds two test files:
``tests/models/transformers/test_models_transformer_lens.py`` and
``tests/pipelines/lens/test_pipeline_lens.py``. This script copies the checkout's
``tests/`` folder into a temporary folder, writes a second copy of each Lens test file
beside the original in which only the import of the classes under test
(``LensPipeline``, ``LensTransformer2DModel``) is changed to lens_fast, runs pytest on
both, and prints (and with --out writes) a table of every test's outcome for each,
with the known exceptions and why each is one. It exits 1 when a test that passes for
diffusers' classes fails for lens_fast's and is not a listed exception.

Nothing of diffusers is kept in this repository: the tests come from a checkout you
give (``--diffusers PATH``, a clone at that commit: it needs ``src/`` and ``tests/``), or
are downloaded from GitHub (``--download``, when the network allows). diffusers' test
helpers need a few test-only packages: ``pip install -e ".[diffusers-tests]"``.

Both runs import diffusers from the checkout's ``src/`` (the released diffusers that
constraints.txt pins has no Lens classes), so lens_fast is measured against the diffusers
of that commit; the report's first line names both versions.

    python bench/diffusers_parity.py --diffusers ~/src/diffusers --out parity.md
    make diffusers-parity DIFFUSERS=~/src/diffusers
"""
from __future__ import annotations

import argparse
import io
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
import xml.etree.ElementTree as ET

COMMIT = "d004842010be438a786e851450e7125780ae6c8e"
ARCHIVE = "https://codeload.github.com/huggingface/diffusers/tar.gz/" + COMMIT
MODEL_TESTS = "tests/models/transformers/test_models_transformer_lens.py"
PIPELINE_TESTS = "tests/pipelines/lens/test_pipeline_lens.py"

# Tests that pass for diffusers' classes and fail for lens_fast's on purpose.
EXCEPTIONS = {
    "test_from_save_pretrained_variant": (
        "asserts the wording of diffusers' pickle fallback ('Error no file named diffusion_pytorch_model.bin "
        "found in directory'); lens_fast never looks for .bin files: it raises the same exception type "
        "(OSError) naming the missing safetensors file and the variant the folder holds"),
}


def fetch_checkout(dest: str) -> str:
    """Download and unpack the diffusers commit into ``dest``; returns the checkout root."""
    with urllib.request.urlopen(ARCHIVE, timeout=120) as r:  # noqa: S310 - a fixed https URL
        data = r.read()
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        tar.extractall(dest, filter="data")
    return os.path.join(dest, f"diffusers-{COMMIT}")


def lens_fast_copy(source: str) -> str:
    """``source`` with the classes under test imported from lens_fast instead of diffusers."""
    out, n = re.subn(r"^from diffusers import LensTransformer2DModel$", "from lens_fast import LensTransformer2DModel",
                     source, flags=re.M)
    if n == 0:
        out, n = re.subn(r"^from diffusers import \(\n((?:    \w+,\n)+)\)", _split_import, source, flags=re.M)
    if n != 1:
        raise SystemExit("could not find the import of the Lens classes to change; is this the Lens commit?")
    return out


def _split_import(m) -> str:
    names = [n.strip().rstrip(",") for n in m.group(1).splitlines()]
    ours = [n for n in names if n in ("LensPipeline", "LensTransformer2DModel")]
    rest = [n for n in names if n not in ours]
    lines = ["from diffusers import (", *[f"    {n}," for n in rest], ")"] if rest else []
    return "\n".join(lines + [f"from lens_fast import {', '.join(ours)}"])


def prepare(checkout: str, work: str) -> dict:
    for rel in (MODEL_TESTS, PIPELINE_TESTS):
        if not os.path.isfile(os.path.join(checkout, rel)):
            raise SystemExit(f"{checkout} has no {rel}; expected a diffusers checkout at commit {COMMIT[:10]}")
    shutil.copytree(os.path.join(checkout, "tests"), os.path.join(work, "tests"))
    os.symlink(os.path.abspath(os.path.join(checkout, "src")), os.path.join(work, "src"))
    runs = {"diffusers": [MODEL_TESTS, PIPELINE_TESTS], "lens_fast": []}
    for rel in (MODEL_TESTS, PIPELINE_TESTS):
        with open(os.path.join(work, rel), encoding="utf-8") as f:
            text = f.read()
        ours = rel.replace(".py", "_lens_fast.py")
        with open(os.path.join(work, ours), "w", encoding="utf-8") as f:
            f.write(lens_fast_copy(text))
        runs["lens_fast"].append(ours)
    return runs


def run(work: str, files, name: str) -> dict:
    """{test id: outcome} of one pytest run (ids without the file, so both runs compare)."""
    xml = os.path.join(work, f"{name}.xml")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.path.join(work, "src")}
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=",
                    f"--junitxml={xml}", *files], cwd=work, env=env, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, check=False)
    outcomes = {}
    for case in ET.parse(xml).getroot().iter("testcase"):
        cls = case.get("classname", "").rsplit(".", 1)[-1]
        kind = "passed"
        for child in case:
            if child.tag in ("failure", "error"):
                kind = "failed"
            elif child.tag == "skipped":
                kind = "skipped"
        outcomes[f"{cls}::{case.get('name')}"] = kind
    return outcomes


def versions(checkout: str) -> str:
    """Which diffusers ran (the checkout's) and which one is installed."""
    text = open(os.path.join(checkout, "src", "diffusers", "__init__.py"), encoding="utf-8").read()
    found = re.search(r'^__version__ = "([^"]+)"', text, flags=re.M)
    try:
        from importlib.metadata import version

        installed = version("diffusers")
    except Exception:  # noqa: BLE001 - only for the report line
        installed = "not installed"
    return (f"diffusers {found.group(1) if found else '?'} from the checkout at {COMMIT[:10]} "
            f"(installed: {installed}); Python {sys.version.split()[0]}")


def report(ref: dict, ours: dict, header: str = "") -> tuple:
    rows, regressions = [], []
    for test in sorted(set(ref) | set(ours)):
        a, b = ref.get(test, "absent"), ours.get(test, "absent")
        note = ""
        if a == "passed" and b != "passed":
            name = test.split("::")[1].split("[")[0]
            note = EXCEPTIONS.get(name, "")
            if not note:
                regressions.append(test)
                note = "REGRESSION"
        rows.append(f"| {test} | {a} | {b} | {note} |")
    count = lambda d, k: sum(v == k for v in d.values())  # noqa: E731
    head = ([header, ""] if header else []) + [f"diffusers' classes: {count(ref, 'passed')} passed, {count(ref, 'failed')} failed, "
            f"{count(ref, 'skipped')} skipped",
            f"lens_fast's classes: {count(ours, 'passed')} passed, {count(ours, 'failed')} failed, "
            f"{count(ours, 'skipped')} skipped",
            f"passing for diffusers and not for lens_fast: {sum(ref.get(t) == 'passed' and ours.get(t) != 'passed' for t in ref)}"
            f" ({len(regressions)} unlisted)", "",
            "| test | diffusers | lens_fast | note |", "|---|---|---|---|"]
    return "\n".join(head + rows) + "\n", regressions


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--diffusers", help="a diffusers checkout at the Lens commit (with src/ and tests/)")
    src.add_argument("--download", action="store_true", help=f"download diffusers at {COMMIT[:10]} from GitHub")
    p.add_argument("--out", help="also write the table to this markdown file")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="lens-diffusers-parity-") as tmp:
        checkout = fetch_checkout(tmp) if args.download else os.path.abspath(args.diffusers)
        work = os.path.join(tmp, "work")
        os.makedirs(work)
        runs = prepare(checkout, work)
        ref = run(work, runs["diffusers"], "diffusers")
        ours = run(work, runs["lens_fast"], "lens_fast")
        header = versions(checkout)
    text, regressions = report(ref, ours, header)
    print(text)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text)
    return 1 if regressions else 0


if __name__ == "__main__":
    sys.exit(main())
