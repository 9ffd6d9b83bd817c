"""A distilled student's export is a Turbo checkpoint folder (LensPipeline, lens-fast
generate and the inference engine default to 4 steps / guidance 1 on it), and the
distill command's bad inputs stop with one line, exit 2 and leave files alone."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from lens_fast import LensPipeline, LensTransformer2DModel
from lens_fast.cli import main as lens_fast_main
from lens_fast.tiny import make_tiny_checkpoint, randomize_
from lens_fast.train import BucketData, InMemorySource, Trainer, load_config
from lens_fast.train.cli import main as train_main
from lens_fast.train.config import RECIPES
from lens_fast.train.run_dir import LOCK_NAME

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def lens_folder(tmp_path_factory):
    return make_tiny_checkpoint(str(tmp_path_factory.mktemp("lens") / "Lens"), seed=4)


def test_export_is_a_turbo_folder_that_loads_with_turbo_defaults(lens_folder, tmp_path, conformance_dir):
    cfg = load_config("tiny-cpu")
    cfg.recipe = "distill"
    cfg.distill.teacher, cfg.distill.teacher_dtype, cfg.distill.fake_updates = lens_folder, "float32", 1
    cfg.override(["logging.progress_bar=false", "ema.decay=0.5"])
    g = torch.Generator().manual_seed(0)
    data = InMemorySource({(2, 2): BucketData(torch.randn(8, 4, 128, generator=g),
                                              [torch.randn(8, 3, 40, generator=g) for _ in range(3)],
                                              torch.ones(8, 3, dtype=torch.bool))}, 4)
    trainer = Trainer(cfg, data=data, out_dir=str(tmp_path / "run"))
    trainer.train(max_steps=2)
    export = tmp_path / "run" / "export"
    index = json.loads((export / "model_index.json").read_text())
    assert index["_lens_variant"] == "lens-turbo" and index["transformer"] == ["diffusers", "LensTransformer2DModel"]
    # The official transformer config fields and state-dict keys (diffusers adds _diffusers_version).
    official = json.loads(open(os.path.join(conformance_dir, "transformer", "config.json")).read())
    config = json.loads((export / "transformer" / "config.json").read_text())
    assert set(config) | {"_diffusers_version"} == set(official)
    with safe_open(str(export / "transformer" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert keys == set(LensTransformer2DModel(**trainer.model_config).state_dict())
    for name in ("vae", "text_encoder", "tokenizer", "scheduler"):  # the teacher's components come along
        assert index[name][0] is not None and (export / name).is_dir()
    pipe = LensPipeline.from_pretrained(str(export), torch_dtype=torch.float32, template_date="2026-01-01")
    assert pipe.variant == "lens-turbo" and pipe.recommended == (4, 1.0)
    ema = trainer.full_state_dict(ema=True)
    assert all(torch.equal(ema[k], v) for k, v in pipe.transformer.state_dict().items())
    trainer.close()

    # lens-fast generate, no --steps / --guidance: the same image as 4 steps at guidance 1
    out = tmp_path / "turbo.png"
    assert lens_fast_main(["generate", "--model", str(export), "--prompt", "a red circle", "--height", "32",
                           "--width", "32", "--dtype", "float32", "--quiet", "--template-date", "2026-01-01",
                           "--out", str(out)]) == 0
    pipe.set_progress_bar_config(disable=True)
    explicit = pipe("a red circle", height=32, width=32, num_inference_steps=4, guidance_scale=1.0,
                    generator=torch.Generator().manual_seed(0)).images[0]
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(explicit))
    # the inference engine: four denoiser steps with the variant's defaults (diffusers' 50 / 4.0 otherwise)
    pipe.use_recommended_defaults()
    pipe.enable_fast_path()
    steps = []
    default = pipe("a red circle", height=32, width=32, generator=torch.Generator().manual_seed(0), output_type="np",
                   callback_on_step_end=lambda p, i, t, kw: steps.append(i) or kw).images
    assert steps == [0, 1, 2, 3]
    again = pipe("a red circle", height=32, width=32, num_inference_steps=4, guidance_scale=1.0, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    assert np.array_equal(default, again)


# -- bad input ---------------------------------------------------------------------------
def tiny_teacher(folder, seed, **overrides):
    cfg = load_config("tiny-cpu").model.transformer
    randomize_(LensTransformer2DModel(**{**cfg, **overrides}), seed).save_pretrained(str(folder / "transformer"))
    return str(folder)


def snapshot(folder):
    """Every file's bytes, but the run folder's lock (its holder's pid and start time,
    rewritten by each process that takes the lock)."""
    out = {}
    for here, _, files in os.walk(folder):
        for name in files:
            if name == LOCK_NAME and here == str(folder):
                continue
            with open(os.path.join(here, name), "rb") as f:
                out[os.path.relpath(os.path.join(here, name), folder)] = f.read()
    return out


DISTILL = ["--config", "tiny-cpu", "--recipe", "distill", "--no-progress", "--max-steps", "1",
           "--set", "distill.fake_updates=1", "--set", "distill.teacher_dtype=float32"]


def one_line_error(capsys, rc, expected):
    err = capsys.readouterr().err
    assert rc == 2 and expected in err, err
    assert err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize("make, expected", [
    (lambda tmp: str(tmp / "absent"), "does not exist"),
    (lambda tmp: str(tmp), "is not a Lens checkpoint: it has neither transformer/config.json nor config.json"),
    (lambda tmp: (tmp / "config.json").write_text('{"_class_name": "UNet2DConditionModel"}') and str(tmp),
     "describes a UNet2DConditionModel, not a LensTransformer2DModel"),
])
def test_a_missing_or_foreign_teacher_is_refused(tmp_path, capsys, make, expected):
    teacher = tmp_path / "teacher"
    teacher.mkdir()
    rc = train_main([*DISTILL, "--teacher", make(teacher), "--out", str(tmp_path / "run")])
    one_line_error(capsys, rc, expected)
    assert not (tmp_path / "run").exists()


def test_a_teacher_whose_config_differs_from_the_students_is_refused(tmp_path, capsys):
    teacher = tiny_teacher(tmp_path / "teacher", 1)
    student = tiny_teacher(tmp_path / "student", 2, num_layers=3)
    rc = train_main([*DISTILL, "--teacher", teacher, "--pretrained", student, "--out", str(tmp_path / "run")])
    one_line_error(capsys, rc, "its model config differs from the student's in ['num_layers']")
    assert not (tmp_path / "run").exists()


def test_resuming_with_another_teacher_is_refused_and_the_run_is_left_alone(tmp_path, capsys):
    first, second = tiny_teacher(tmp_path / "a", 1), tiny_teacher(tmp_path / "b", 2)
    run = tmp_path / "run"
    assert train_main([*DISTILL, "--teacher", first, "--out", str(run)]) == 0
    capsys.readouterr()
    before = snapshot(run)
    rc = train_main([*DISTILL, "--teacher", second, "--out", str(run), "--resume", "--max-steps", "2"])
    one_line_error(capsys, rc, "holds other weights")
    assert snapshot(run) == before
    rc = train_main(["--config", "tiny-cpu", "--no-progress", "--out", str(run), "--resume", "--max-steps", "2"])
    one_line_error(capsys, rc, "its run used recipe 'distill'; this run is 'pretrain'")
    assert snapshot(run) == before


@pytest.mark.parametrize("args, expected", [
    (["--set", "distill.fake_update=3"], "unknown key distill.fake_update"),
    (["--set", "distill.schedule=shared"], "distill.schedule='shared': expected hybrid or coupled"),
    (["--recipe", "reflow"], f"recipe='reflow': expected one of {list(RECIPES)}"),
    (["--recipe", "rl"], "distill.teacher='T' is set but the recipe is rl"),
    (["--recipe", "pretrain"], "distill.teacher='T' is set but the recipe is pretrain"),
])
def test_unknown_or_misplaced_recipe_options_are_refused(tmp_path, capsys, args, expected):
    rc = train_main([*DISTILL, "--teacher", "T", "--out", str(tmp_path / "run"), *args])
    one_line_error(capsys, rc, expected)
    assert not (tmp_path / "run").exists()
