"""The lens-fast command line: generate, user errors without tracebacks."""
import os
import subprocess
import sys

import pytest
from PIL import Image

from lens_fast.cli import main
from lens_fast.tiny import make_tiny_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_checkpoint(str(tmp_path_factory.mktemp("cli") / "Lens-Turbo"), seed=2)


def test_generate_one_and_several_prompts(ckpt, tmp_path, capsys):
    out = tmp_path / "img.png"
    rc = main(["generate", "--model", ckpt, "--prompt", "a red circle", "--height", "32", "--width", "48",
               "--steps", "2", "--dtype", "float32", "--quiet", "--template-date", "2026-01-01", "--out", str(out)])
    assert rc == 0 and Image.open(out).size == (48, 32)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n\na blue square\n")
    rc = main(["generate", "--model", ckpt, "--prompt-file", str(prompts), "--prompt", "a cat", "--steps", "1",
               "--height", "32", "--width", "32", "--guidance", "3", "--dtype", "float32", "--quiet",
               "--out", str(tmp_path / "many.png")])
    assert rc == 0
    assert sorted(f for f in os.listdir(tmp_path) if f.startswith("many_")) == \
        ["many_000.png", "many_001.png", "many_002.png"]


def test_existing_output_is_not_overwritten(ckpt, tmp_path, capsys):
    out = tmp_path / "keep.png"
    out.write_bytes(b"user data")
    rc = main(["generate", "--model", ckpt, "--prompt", "x", "--out", str(out), "--steps", "1",
               "--height", "32", "--width", "32"])
    assert rc == 2 and out.read_bytes() == b"user data"
    assert "already exists" in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["--height", "40", "--width", "32"], "--height 40: expected a multiple of 16"),
    (["--base-resolution", "1024", "--aspect-ratio", "7:5"], "argument --aspect-ratio: invalid choice: '7:5'"),
    (["--height", "32"], "--height and --width must be given together"),
])
def test_user_errors_exit_2_with_one_line(ckpt, tmp_path, capsys, extra, message):
    rc = main(["generate", "--model", ckpt, "--prompt", "x", "--steps", "1", "--dtype", "float32", "--quiet",
               "--out", str(tmp_path / "o.png")] + extra)
    err = capsys.readouterr().err
    assert rc == 2 and message in err and "Traceback" not in err


def test_missing_model_folder_subprocess(tmp_path):
    # The command re-runs itself with OMP_WAIT_POLICY=PASSIVE: libgomp, printing its settings
    # (OMP_DISPLAY_ENV), shows the spin count at 0 in the re-run process (300000 before it).
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    proc = subprocess.run([sys.executable, "-m", "lens_fast.cli", "generate", "--model", str(tmp_path / "nope"),
                           "--prompt", "x", "--out", str(tmp_path / "o.png")], capture_output=True, text=True,
                          timeout=120, env={**env, "OMP_DISPLAY_ENV": "VERBOSE"})
    assert "GOMP_SPINCOUNT = '0'" in proc.stderr
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("lens-fast")]
    assert errors == [f"lens-fast: error: --model {tmp_path / 'nope'} does not exist; expected a Lens checkpoint "
                      "folder"] and "Traceback" not in proc.stderr
