"""Recipe lora (train/lora.py) on the trainer's one loop: the base stays frozen, only the
adapters train and are checkpointed, the export loads back through LensPipeline's loader
to the trained model's own output, a resume equals the uninterrupted run, and bad
adapter settings are one line, exit 2, before anything is written."""
import os
import shutil

import pytest
import torch

from lens_fast import LensTransformer2DModel
from lens_fast.cli import main as cli_main
from lens_fast.lora import LORA_WEIGHT_NAME, adapters, formats, is_adapted
from lens_fast.tiny import randomize_
from lens_fast.train import Trainer, load_config
from lens_fast.train.checkpoint import saved_keys

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    folder = tmp_path_factory.mktemp("base")
    cfg = load_config("tiny-cpu")
    randomize_(LensTransformer2DModel(**cfg.model.transformer), 3, std=0.08).save_pretrained(
        str(folder / "transformer"))
    return str(folder)


def lora_config(base, *sets):
    cfg = load_config("tiny-cpu")
    cfg.recipe = "lora"
    return cfg.override(["logging.progress_bar=false", "optim.warmup_steps=1", "optim.lr=1e-2",
                         f"model.pretrained={base}", "lora.rank=4", "lora.alpha=8", "lora.base_dtype=float32",
                         "lora.targets=[attn, '*.img_mlp.w2']", *sets])


def _inputs(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    c = model.config
    feats = [torch.randn(2, 5, c.enc_hidden_dim, generator=g) for _ in c.selected_layer_index]
    return dict(hidden_states=torch.randn(2, 12, c.in_channels, generator=g), encoder_hidden_states=feats,
                encoder_hidden_states_mask=torch.ones(2, 5, dtype=torch.bool), timestep=torch.tensor([0.2, 0.6]),
                img_shapes=[(1, 3, 4)])


def test_the_base_stays_frozen_and_the_export_loads_back_to_the_trained_output(base, tmp_path):
    trainer = Trainer(lora_config(base, "checkpoint.every=3", "ema.enabled=false"), out_dir=str(tmp_path / "run"))
    model = trainer.model
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all(n.endswith((".lora_down", ".lora_up")) for n in trained)
    frozen_before = {n: p.clone() for n, p in model.named_parameters() if n not in trained}
    trainer.train(max_steps=3)
    assert all(torch.equal(frozen_before[n], p) for n, p in model.named_parameters() if n not in trained)
    learned = [n for n, p in model.named_parameters() if n.endswith(".lora_up") and p.abs().max() > 0]
    assert "transformer_blocks.1.attn.img_qkv.lora_up" in learned and len(learned) >= 8  # B starts at zero
    keys = saved_keys(str(tmp_path / "run" / "checkpoints" / "step_3"))
    assert {k[len("model."):] for k in keys if k.startswith("model.")} == trained  # adapters only, no base

    export = tmp_path / "run" / "export" / "lora"
    read = formats.read_file(str(export / LORA_WEIGHT_NAME))
    adapted = sorted(n for n, m in model.named_modules() if is_adapted(m))
    assert len(adapted) == 2 * 4 + 2  # 2 blocks x (img_qkv, txt_qkv, to_out.0, to_add_out) + img_mlp.w2
    assert sorted({k.rsplit(".lora_", 1)[0] for k in read.tensors if ".lora_" in k}) == [
        f"transformer.{n}" for n in adapted]

    fresh = LensTransformer2DModel.from_pretrained(os.path.join(base, "transformer"))
    with torch.no_grad():
        plain = fresh(**_inputs(fresh)).sample
        adapters.load(fresh, str(export), "style")
        for n in adapted:
            got = fresh.get_submodule(n)
            want = model.get_submodule(n)
            assert torch.equal(got.lora_down[:4], want.lora_down) and torch.equal(got.lora_up[:, :4], want.lora_up)
        model.eval()
        loaded, reference = fresh(**_inputs(fresh)).sample, model(**_inputs(model)).sample
    torch.testing.assert_close(loaded, reference, rtol=0, atol=1e-6)
    assert (loaded - plain).abs().max() > 1e-4  # the adapters change the output
    trainer.close()


def test_a_resumed_lora_run_equals_the_uninterrupted_one(base, tmp_path):
    sets = ["checkpoint.every=2"]
    ref = Trainer(lora_config(base, *sets), out_dir=str(tmp_path / "ref"))
    ref.train(max_steps=4)
    cut = Trainer(lora_config(base, *sets), out_dir=str(tmp_path / "cut"))
    cut.train(max_steps=3)
    cut.close()
    shutil.rmtree(tmp_path / "cut" / "checkpoints" / "step_3")  # as if it died after step 3
    resumed = Trainer(lora_config(base, *sets), out_dir=str(tmp_path / "cut"), resume=True)
    assert resumed.step == 2
    resumed.train(max_steps=4)
    for (k, p), q in zip(ref.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(p, q), k
    ref.close()
    resumed.close()
    with pytest.raises(ValueError, match="lora rank differ"):
        Trainer(lora_config(base, *sets, "lora.rank=8"), out_dir=str(tmp_path / "cut"), resume=True)


@pytest.mark.parametrize("extra, message", [
    (["--targets", "attn,nothing_like_this"], "'nothing_like_this' names no linear module"),
    (["--rank", "0"], "--rank"),
    (["--targets", ","], "lora.targets"),
])
def test_bad_adapter_settings_are_one_line_exit_2_and_write_nothing(base, tmp_path, capsys, extra, message):
    out = tmp_path / "run"
    code = cli_main(["train", "--config", "tiny-cpu", "--recipe", "lora", "--pretrained", base, "--out", str(out),
                     "--max-steps", "1", *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1, err
    assert not out.exists() or not os.listdir(out)


def test_a_lora_run_without_a_base_is_refused(tmp_path, capsys):
    code = cli_main(["train", "--config", "tiny-cpu", "--recipe", "lora", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "--pretrained" in err and len(err.splitlines()) == 1, err


def test_two_ranks_with_fsdp2_match_one_process_and_export_the_same_adapters(base, tmp_path, train_metrics):
    from safetensors.torch import load_file

    args = ["--config", "tiny-cpu", "--recipe", "lora", "--pretrained", base, "--rank", "4", "--targets", "attn",
            "--max-steps", "3", "--lr", "1e-2", "--set", "logging.progress_bar=false", "--set", "ema.enabled=false",
            "--set", "lora.base_dtype=float32"]
    two = train_metrics(args, tmp_path / "two", ranks=2)
    one = train_metrics(args, tmp_path / "one", "--set", "train.grad_accum=2")
    assert sorted(two) == [1, 2, 3] and two[3]["world"] == 2
    for step, r in one.items():
        assert two[step]["loss"] == pytest.approx(r["loss"], rel=1e-4), step
    a, b = (load_file(str(tmp_path / run / "export" / "lora" / LORA_WEIGHT_NAME)) for run in ("one", "two"))
    assert a.keys() == b.keys() and len(a) == 2 * 2 * 4
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)
