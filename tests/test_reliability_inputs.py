"""Reliability of inputs: every bad value, file or output path a user can give to
`lens-fast generate | train | demo` is refused with one line and exit status 2 before
any model loads; safetensors only on every component (pickle-only folders refused with
how to convert; every corrupt file named); and bugs are told apart from user errors."""
import errno
import json
import os
import shutil

import pytest
import torch

import lens_fast.cli as cli
from lens_fast.errors import CorruptFile, MissingFile, UserError, run_cli
from lens_fast.pipeline import LensPipeline
from lens_fast.text_encoder import LensTextEncoder
from lens_fast.tiny import make_tiny_checkpoint
from lens_fast.toy import demo

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_checkpoint(str(tmp_path_factory.mktemp("inputs") / "Lens-Turbo"), seed=4)


@pytest.fixture
def no_loading(monkeypatch):
    """Fails the test if any model starts loading: the checks must all come first."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model started loading before the inputs were checked")
    monkeypatch.setattr(LensPipeline, "from_pretrained", refuse)
    monkeypatch.setattr(demo, "MiniLMTextEncoder", refuse)


def one_line_error(capsys, rc, expected_rc=2):
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == expected_rc and len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


# -- generate: values, files and outputs, all before the model loads ---------------------
GENERATE_BAD = [
    (["--guidance", "nan"], "argument --guidance: expected a finite number in [0, 100], got 'nan'"),
    (["--guidance", "inf"], "got 'inf'"),
    (["--guidance", "-1"], "got '-1'"),
    (["--guidance", "1e400"], "got '1e400'"),
    (["--steps", "0"], "argument --steps: expected an integer in [1, 1000], got '0'"),
    (["--steps", "-3"], "got '-3'"),
    (["--steps", "2.5"], "got '2.5'"),
    (["--steps", "abc"], "got 'abc'"),
    (["--seed", "-1"], "argument --seed: expected an integer in [0, 9223372036854775807]"),
    (["--seed", "99999999999999999999"], "argument --seed"),
    (["--height", "0", "--width", "32"], "argument --height: expected an integer in [16, 8192], got '0'"),
    (["--height", "-32", "--width", "32"], "argument --height"),
    (["--height", "32", "--width", "100000"], "argument --width"),
    (["--height", "40", "--width", "32"], "--height 40: expected a multiple of 16"),
    (["--height", "32"], "--height and --width must be given together"),
    (["--height", "32", "--width", "32", "--base-resolution", "1024", "--aspect-ratio", "1:1"], "not both"),
    (["--base-resolution", "1024"], "--base-resolution and --aspect-ratio must be given together"),
    (["--base-resolution", "999", "--aspect-ratio", "1:1"], "argument --base-resolution: invalid choice"),
    (["--aspect-ratio", "7:5"], "argument --aspect-ratio: invalid choice: '7:5'"),
    (["--max-sequence-length", "0"], "argument --max-sequence-length: expected an integer in [1, 8192]"),
    (["--template-date", "2026-13-01"], "--template-date='2026-13-01'; expected a real calendar date"),
    (["--template-date", "yesterday"], "--template-date='yesterday'"),
    (["--device", "cuda:0"] if not torch.cuda.is_available() else ["--device", "cuda:99"], "--device cuda"),
    (["--device", "tpu"], "--device 'tpu': expected cpu, cuda or cuda:N"),
    (["--dtype", "float8"], "argument --dtype: invalid choice"),
    (["--quantization", "int4"], "argument --quantization: invalid choice"),
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["--prompt", ""], "--prompt number 2 is empty"),
    (["--prompt", "   "], "--prompt number 2 is empty"),
]


@pytest.mark.parametrize("extra, message", GENERATE_BAD, ids=[" ".join(e) for e, _ in GENERATE_BAD])
def test_bad_generate_values_exit_2_in_one_line_before_loading(ckpt, tmp_path, capsys, no_loading, extra, message):
    out = tmp_path / "o.png"
    rc = cli.main(["generate", "--model", ckpt, "--prompt", "x", "--out", str(out), *extra])
    assert message in one_line_error(capsys, rc)
    assert not out.exists()


def generate_paths(tmp_path):
    (tmp_path / "afile").write_text("x")
    (tmp_path / "adir.png").mkdir()
    (tmp_path / "taken.png").write_bytes(b"user data")
    (tmp_path / "many_001.png").write_bytes(b"user data")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    (tmp_path / "blank.txt").write_text("\n  \n")
    return {
        "out_is_a_folder": (["--out", str(tmp_path / "adir.png")], "is a folder; expected a file name"),
        "out_exists": (["--out", str(tmp_path / "taken.png")], "already exists; pass --overwrite"),
        "numbered_out_exists": (["--prompt", "y", "--out", str(tmp_path / "many.png")], "many_001.png already exists"),
        "out_extension": (["--out", str(tmp_path / "o.gif")], "must name an image file"),
        "out_parent_is_a_file": (["--out", str(tmp_path / "afile" / "o.png")], "afile is a file, not a folder"),
        "out_unwritable": (["--out", "/proc/lens_fast_test/o.png"], "cannot create files in /proc"),
        "prompt_file_missing": (["--prompt-file", str(tmp_path / "nope.txt")], "--prompt-file"),
        "prompt_file_is_a_folder": (["--prompt-file", str(tmp_path)], "is not a file"),
        "prompt_file_not_utf8": (["--prompt-file", str(tmp_path / "latin1.txt")], "is not UTF-8 text"),
        "model_missing": (["--model", str(tmp_path / "nope")], "--model"),
        "model_not_a_checkpoint": (["--model", str(tmp_path)], "model_index.json is missing"),
    }


GENERATE_PATH_CASES = ["out_is_a_folder", "out_exists", "numbered_out_exists", "out_extension",
                       "out_parent_is_a_file", "out_unwritable", "prompt_file_missing", "prompt_file_is_a_folder",
                       "prompt_file_not_utf8", "model_missing", "model_not_a_checkpoint"]


@pytest.mark.parametrize("case", GENERATE_PATH_CASES)
def test_bad_generate_paths_exit_2_in_one_line_before_loading(ckpt, tmp_path, capsys, no_loading, case):
    extra, message = generate_paths(tmp_path)[case]
    before = {p: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    rc = cli.main(["generate", "--model", ckpt, "--prompt", "x", "--out", str(tmp_path / "o.png"), *extra])
    assert message in one_line_error(capsys, rc)
    assert {p: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before  # nothing written or lost
    assert not (tmp_path / "o.png").exists()


def test_overwrite_replaces_atomically_and_guidance_nan_is_refused_by_the_pipeline_too(ckpt, tmp_path, capsys):
    out = tmp_path / "o.png"
    out.write_bytes(b"old")
    args = ["generate", "--model", ckpt, "--prompt", "x", "--height", "32", "--width", "32", "--steps", "1",
            "--dtype", "float32", "--quiet", "--out", str(out)]
    assert cli.main(args + ["--overwrite"]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and os.listdir(tmp_path) == ["o.png"]
    pipe = LensPipeline.from_pretrained(ckpt, torch_dtype=torch.float32)
    with pytest.raises(ValueError, match="guidance_scale=nan: expected a finite number"):
        pipe("x", height=32, width=32, num_inference_steps=1, guidance_scale=float("nan"))


# -- every component: safetensors only, each corrupt file named --------------------------
def truncate(path):
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[:len(data) // 3])


def to_pickle(folder, name):
    """Replace a component's safetensors weights by a pickle file of the same tensors."""
    from safetensors.torch import load_file

    for n in os.listdir(folder):
        if n.endswith(".safetensors"):
            tensors = load_file(os.path.join(folder, n))
            os.remove(os.path.join(folder, n))
            torch.save(tensors, os.path.join(folder, name))


COMPONENT_FAULTS = {
    "text_encoder_pickle_only": (lambda f: to_pickle(f"{f}/text_encoder", "pytorch_model.bin"),
                                 r"text_encoder \(the text encoder\) holds only pickle weights \(pytorch_model\.bin\)"),
    "text_encoder_truncated": (lambda f: truncate(f"{f}/text_encoder/model.safetensors"),
                               "corrupt safetensors file .*text_encoder/model.safetensors"),
    "transformer_pickle_only": (lambda f: to_pickle(f"{f}/transformer", "diffusion_pytorch_model.bin"),
                                "transformer .* holds only pickle weights"),
    "transformer_truncated": (lambda f: truncate(f"{f}/transformer/diffusion_pytorch_model.safetensors"),
                              "corrupt safetensors file .*transformer/diffusion_pytorch_model.safetensors"),
    "vae_pickle_only": (lambda f: to_pickle(f"{f}/vae", "diffusion_pytorch_model.bin"), "vae .* only pickle"),
    "vae_truncated": (lambda f: truncate(f"{f}/vae/diffusion_pytorch_model.safetensors"),
                      "corrupt safetensors file .*vae/diffusion_pytorch_model.safetensors"),
    "vae_no_weights": (lambda f: os.remove(f"{f}/vae/diffusion_pytorch_model.safetensors"), "holds no weights"),
    "model_index_json": (lambda f: open(f"{f}/model_index.json", "w").write("{"), "model_index.json is not valid JSON"),
    "transformer_config": (lambda f: open(f"{f}/transformer/config.json", "w").write("[1,"),
                           "transformer/config.json is not valid JSON"),
    "text_encoder_config": (lambda f: open(f"{f}/text_encoder/config.json", "w").write("nope"),
                            "text_encoder/config.json is not valid JSON"),
    "tokenizer_json": (lambda f: open(f"{f}/tokenizer/tokenizer.json", "w").write('{"a":'),
                       "tokenizer/tokenizer.json is not valid JSON"),
    "scheduler_missing": (lambda f: os.remove(f"{f}/scheduler/scheduler_config.json"),
                          "missing .*scheduler_config.json"),
    "sharded_index_names_a_missing_shard": (
        lambda f: open(f"{f}/text_encoder/model.safetensors.index.json", "w").write(
            json.dumps({"weight_map": {"w": "model-00002-of-00002.safetensors"}})), "names shard.*missing"),
    "component_folder_missing": (lambda f: shutil.rmtree(f"{f}/vae"), "missing the vae/ folder"),
}


@pytest.mark.parametrize("case", sorted(COMPONENT_FAULTS))
def test_every_component_file_is_checked_and_nothing_is_unpickled(ckpt, tmp_path, capsys, monkeypatch, case):
    folder = str(tmp_path / "Lens")
    shutil.copytree(ckpt, folder)
    damage, message = COMPONENT_FAULTS[case]
    damage(folder)
    loaded = []
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load was called: pickle"))
    real = LensTextEncoder.from_pretrained.__func__
    monkeypatch.setattr(LensTextEncoder, "from_pretrained",
                        classmethod(lambda cls, *a, **k: loaded.append("te") or real(cls, *a, **k)))
    with pytest.raises(UserError, match=message) as info:
        LensPipeline.from_pretrained(folder, torch_dtype=torch.float32)
    assert "\n" not in str(info.value)
    if "pickle" in case:
        assert "convert it once" in str(info.value) and "safetensors" in str(info.value)
    if not case.startswith("text_encoder"):
        assert loaded == []  # refused before the text encoder (or anything) loaded
    rc = cli.main(["generate", "--model", folder, "--prompt", "x", "--height", "32", "--width", "32", "--quiet",
                   "--out", str(tmp_path / "o.png")])
    one_line_error(capsys, rc)
    assert not (tmp_path / "o.png").exists()


def test_text_encoder_refuses_pickle_even_where_transformers_would_load_it(ckpt, tmp_path):
    folder = str(tmp_path / "Lens")
    shutil.copytree(ckpt, folder)
    to_pickle(f"{folder}/text_encoder", "pytorch_model.bin")
    with pytest.raises(MissingFile, match=r"torch\.load\('.*pytorch_model\.bin', weights_only=True\), "
                                          r"'.*text_encoder/model\.safetensors'\)"):
        LensTextEncoder.from_pretrained(folder, [0, 1])
    os.remove(f"{folder}/text_encoder/pytorch_model.bin")
    with pytest.raises(MissingFile, match="holds no weights"):
        LensTextEncoder.from_pretrained(folder, [0, 1])


# -- train: values and paths -------------------------------------------------------------
TRAIN_BAD = [
    (["--lr", "nan"], "argument --lr: expected a finite number > 0 and <= 10, got 'nan'"),
    (["--lr", "inf"], "got 'inf'"),
    (["--lr", "0"], "got '0'"),
    (["--lr=-1e-4"], "got '-1e-4'"),
    (["--max-steps", "-1"], "argument --max-steps: expected an integer in [0, 1000000000000]"),
    (["--max-steps", "1e3"], "got '1e3'"),
    (["--seed", "-5"], "argument --seed: expected an integer in [0, 2147483647]"),
    (["--set", "optim.lr=.nan"], "optim.lr=nan: expected a finite positive number"),
    (["--set", "optim.eps=-1"], "optim.eps=-1"),
    (["--set", "optim.weight_decay=.inf"], "optim.weight_decay=inf"),
    (["--set", "loss.logit_std=.nan"], "loss.logit_std=nan"),
    (["--set", "loss.mu_points=[[1, .nan], [2, 3]]"], "loss.mu_points"),
    (["--set", "ema.decay=1"], "ema.decay=1"),
    (["--set", "train.seed=-1"], "train.seed=-1: expected a non-negative integer"),
    (["--set", "logging.sample_guidance=.inf"], "logging.sample_guidance=inf"),
    (["--set", "data.area_weights=[1, .nan]"], "data.area_weights"),
    (["--set", "encoders.template_date=2025-02-30"], "value is not valid YAML: day is out of range for month"),
    (["--set", "encoders.template_date='2025-02-30'"], "encoders.template_date='2025-02-30'"),
    (["--set", "optim.nope=1"], "unknown key optim.nope"),
    (["--device", "tpu"], "--device 'tpu': expected cpu, cuda or cuda:N"),
    (["--pretrained", "/nonexistent/Lens"], "model.pretrained (--pretrained) /nonexistent/Lens does not exist"),
    (["--data", "/nonexistent/shard-{000..003}.tar"], "4 data shard(s) from pattern"),
    (["--cache", "/nonexistent/cache"], "is not a token cache: index.json is missing"),
]


@pytest.mark.parametrize("extra, message", TRAIN_BAD, ids=[" ".join(e) for e, _ in TRAIN_BAD])
def test_bad_train_values_exit_2_in_one_line_before_anything_is_written(tmp_path, capsys, extra, message):
    out = tmp_path / "run"
    rc = cli.main(["train", "--config", "tiny-cpu", "--out", str(out), "--max-steps", "1", "--no-progress", *extra])
    assert message in one_line_error(capsys, rc)
    assert not out.exists()


def test_bad_train_outputs_and_caches(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "index.json").write_text(json.dumps({"4x4": {"layers": 2, "captions": None}}))
    (cache / "4x4.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")
    for extra, message in [(["--out", str(tmp_path / "afile")], "exists and is not a folder"),
                           (["--out", "/proc/lens_fast_run"], "cannot create the run folder"),
                           (["--out", str(tmp_path / "r"), "--cache", str(cache)], "corrupt safetensors file"),
                           (["--out", str(tmp_path / "r"), "--config", "nope.yaml"], "does not exist")]:
        rc = cli.main(["train", "--config", "tiny-cpu", "--max-steps", "1", "--no-progress", *extra])
        assert message in one_line_error(capsys, rc), extra


# -- demo ----------------------------------------------------------------------------------
def test_bad_demo_values_and_outputs_are_refused_before_the_text_encoder_loads(tmp_path, capsys, no_loading):
    (tmp_path / "afile").write_text("x")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "mine.txt").write_text("mine")
    for extra, message in [(["--out", str(tmp_path / "afile")], "exists and is not a folder"),
                           (["--out", str(tmp_path / "full")], "is not empty (mine.txt)"),
                           (["--out", str(tmp_path / "afile" / "x")], "afile is a file, not a folder"),
                           (["--out", "/proc/lens_fast_demo"], "cannot create files in /proc"),
                           (["--seed", "-1"], "argument --seed"), (["--steps", "0"], "argument --steps"),
                           (["--threads", "0"], "argument --threads"), (["--ablation", "x"], "invalid choice"),
                           (["--lifecycle", "--ablation", "captions"], "--lifecycle with --ablation captions")]:
        rc = cli.main(["demo", "--quick", "--out", str(tmp_path / "new"), *extra])
        assert message in one_line_error(capsys, rc), extra
    assert (tmp_path / "full" / "mine.txt").read_text() == "mine" and not (tmp_path / "new").exists()


# -- user errors vs bugs ---------------------------------------------------------------------
@pytest.mark.parametrize("exc", [TypeError("unsupported operand"), KeyError("weight"), ValueError("a torch bug"),
                                 FileNotFoundError(errno.ENOENT, "No such file", "/tmp/x"), AttributeError("x")])
def test_a_bug_is_reported_as_a_bug_with_its_traceback(capsys, exc):
    def fn(argv):
        raise exc
    assert run_cli("lens-fast", fn, []) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "this is a bug in lens_fast" in err and "Please report it" in err


def test_user_errors_interrupts_and_argparse_exits(capsys):
    def user(argv):
        raise CorruptFile("bad file\nsecond line")
    assert run_cli("lens-fast", user, []) == 2
    assert capsys.readouterr().err == "lens-fast: error: bad file second line\n"

    def interrupted(argv):
        raise KeyboardInterrupt
    assert run_cli("lens-fast", interrupted, []) == 130
    assert cli.main(["--help"]) == 0 and "generate" in capsys.readouterr().out
    assert cli.main(["nope"]) == 2


def test_named_objects_load_or_fail_in_one_line_naming_the_option():
    """`package.module:name` options (RL rewards and rewriters, reasoner metrics) share one
    loader: the object, or an InvalidValue starting with the option and its value."""
    from lens_fast.train.rollout import named_rewrite

    from lens_fast.cli_checks import load_named
    from lens_fast.errors import InvalidValue
    from lens_fast.reasoner.metrics import load_metric
    from lens_fast.rl.registry import build_reward

    assert load_named("os.path:join", "--x") is os.path.join
    for spec, why in (("os.path", "expected 'package.module:name'"), (":join", "expected 'package.module:name'"),
                      ("no_such_module_xyz:f", "cannot load 'f' from 'no_such_module_xyz'"),
                      ("os.path:no_such_name", "cannot load 'no_such_name' from 'os.path'")):
        with pytest.raises(InvalidValue, match=f"^--x: {why}"):
            load_named(spec, "--x")
    with pytest.raises(InvalidValue, match="^rl.rewards has 'os.path:nope': cannot load 'nope'"):
        build_reward({"os.path:nope": 1.0})
    with pytest.raises(InvalidValue, match="^rl.rewrite='os:nope': cannot load 'nope'"):
        named_rewrite("os:nope")
    with pytest.raises(InvalidValue, match="^--metric 'os:nope': cannot load 'nope'"):
        load_metric("os:nope")
    assert named_rewrite(None) is None and named_rewrite("toy").__name__ == "layout_rewrite"
