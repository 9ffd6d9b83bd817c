"""Recipe distill (Decoupled DMD): its losses on tiny models against a plain-PyTorch
reference of the equations in train/distill.md, exact resume of a run, and a recipe
written outside the library plugging into the one loop."""
import dataclasses

import pytest
import torch
from torch.distributions import Normal

from lens_fast import LensTransformer2DModel
from lens_fast.sampling import lens_sigmas
from lens_fast.tiny import randomize_
from lens_fast.train import Trainer, load_config
from lens_fast.train.distill import (CA_NOISE, CA_SIGMA, DM_NOISE, DM_SIGMA, SIM_NOISE, STEP_INDEX, DistillRecipe,
                                     fake_stream)
from lens_fast.train.loss import logit_normal_mu, step_generator
from lens_fast.train.recipe import Recipe

pytestmark = pytest.mark.usefixtures("one_thread")


def save_teacher(folder, seed=3):
    cfg = load_config("tiny-cpu")
    model = randomize_(LensTransformer2DModel(**cfg.model.transformer), seed, std=0.08)
    model.save_pretrained(str(folder / "transformer"))
    return str(folder)


def distill_config(teacher, *sets, **distill):
    cfg = load_config("tiny-cpu")
    cfg.recipe = "distill"
    distill = {"teacher_dtype": "float32", "fake_updates": 2, "guidance": 3.0, **distill}
    cfg.distill = dataclasses.replace(cfg.distill, teacher=teacher, **distill)
    return cfg.override(["logging.progress_bar=false", "optim.warmup_steps=1", *sets])


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return save_teacher(tmp_path_factory.mktemp("teacher"))


# -- the plain reference -----------------------------------------------------------------
def v(model, x, t, text, mask, shapes):
    return model(x, list(text), mask, t, shapes).sample.float()


def gen(seed, step, rank, stream):
    return step_generator(seed, step, rank, stream, "cpu")


def student_image(student, batch, cfg, step, rank, index_stream, noise_stream):
    """Euler from noise along the pipeline's schedule to the drawn step k (no grad),
    then x0 = x_k - sigma_k v (with grad)."""
    steps, (b, n, c) = cfg.distill.steps, batch.latents.shape
    sig, ts = lens_sigmas(steps, n)
    k = int(torch.randint(steps, (1,), generator=gen(cfg.train.seed, step, 0, index_stream)))
    x = torch.randn((b, n, c), generator=gen(cfg.train.seed, step, rank, noise_stream))
    with torch.no_grad():
        for i in range(k):
            x = x + (sig[i + 1] - sig[i]) * v(student, x, (ts[i] / 1000).expand(b), batch.text, batch.text_mask,
                                              batch.img_shapes)
    return x - sig[k] * v(student, x, (ts[k] / 1000).expand(b), batch.text, batch.text_mask, batch.img_shapes), sig[k]


def renoise(x, cfg, step, rank, sigma_stream, noise_stream, high):
    """sigma from the teacher's training logit-normal, truncated to [low, high]."""
    normal = Normal(torch.tensor(0.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64))
    mu, std = logit_normal_mu(x.shape[1], cfg.loss.mu_points), cfg.loss.logit_std
    low = cfg.distill.sigma_range[0]
    high = max(low, min(cfg.distill.sigma_range[1], high))
    a, b = (normal.cdf((torch.logit(torch.tensor(s, dtype=torch.float64)) - mu) / std) for s in (low, high))
    u = torch.rand(x.shape[0], generator=gen(cfg.train.seed, step, rank, sigma_stream)).double()
    s = torch.sigmoid(mu + std * normal.icdf(a + u * (b - a))).float()
    eps = torch.randn(x.shape, generator=gen(cfg.train.seed, step, rank, noise_stream))
    s3 = s.view(-1, 1, 1)
    return s, (1 - s3) * x + s3 * eps


def reference_student_loss(parts, batch, cfg, step, rank):
    student, fake, teacher = (parts[k].model for k in ("model", "fake", "teacher"))
    x_gen, sigma_k = student_image(student, batch, cfg, step, rank, STEP_INDEX, SIM_NOISE)
    x = x_gen.detach()
    d, c = cfg.distill, (batch.text, batch.text_mask, batch.img_shapes)
    uncond = ([torch.zeros_like(t) for t in batch.text], torch.zeros_like(batch.text_mask), batch.img_shapes)
    with torch.no_grad():
        s_dm, x_dm = renoise(x, cfg, step, rank, DM_SIGMA, DM_NOISE, 1.0)
        s3 = s_dm.view(-1, 1, 1)
        real = x_dm - s3 * v(teacher, x_dm, s_dm, *c)
        fake_x0 = x_dm - s3 * v(fake, x_dm, s_dm, *c)
        if d.schedule == "coupled":
            s_ca, x_ca = s_dm, x_dm
        else:
            s_ca, x_ca = renoise(x, cfg, step, rank, CA_SIGMA, CA_NOISE, float(sigma_k))
        sc = s_ca.view(-1, 1, 1)
        vc, vu = v(teacher, x_ca, s_ca, *c), v(teacher, x_ca, s_ca, *uncond)
        comb = vu + d.guidance * (vc - vu)
        comb = comb * vc.norm(dim=-1, keepdim=True) / comb.norm(dim=-1, keepdim=True)
        cond, guided = x_ca - sc * vc, x_ca - sc * comb
        dm = (fake_x0 - real) / (x - real).abs().mean(dim=(1, 2), keepdim=True)
        ca = (cond - guided) / (x - cond).abs().mean(dim=(1, 2), keepdim=True)
        direction = d.dm_weight * dm + d.ca_weight * ca
    return 0.5 * ((x_gen - (x - direction)) ** 2).mean(), {"dm_size": dm.abs().mean(), "ca_size": ca.abs().mean()}


def reference_fake_loss(parts, batch, cfg, step, rank, j):
    with torch.no_grad():
        x0, _ = student_image(parts["model"].model, batch, cfg, step, rank, fake_stream(j, 0), fake_stream(j, 1))
    b = x0.shape[0]
    eps = torch.randn(x0.shape, generator=gen(cfg.train.seed, step, rank, fake_stream(j, 2)))
    z = torch.randn(b, generator=gen(cfg.train.seed, step, rank, fake_stream(j, 3)))
    s = torch.sigmoid(logit_normal_mu(x0.shape[1], cfg.loss.mu_points) + cfg.loss.logit_std * z).view(-1, 1, 1)
    pred = v(parts["fake"].model, (1 - s) * x0 + s * eps, s.view(-1), batch.text, batch.text_mask, batch.img_shapes)
    return ((pred - (eps - x0)) ** 2).mean()


@pytest.mark.parametrize("schedule", ["hybrid", "coupled"])
def test_dmd_losses_and_gradients_match_a_plain_reference(teacher, schedule):
    cfg = distill_config(teacher, schedule=schedule, dm_weight=0.7, ca_weight=1.3)
    trainer = Trainer(cfg)
    trainer.train(max_steps=2)  # student, fake and teacher now differ
    assert isinstance(trainer.recipe, DistillRecipe)
    for rank in (0, 1):
        batch = trainer.data.batch(trainer.step, rank, 2)
        params = [p for p in trainer.model.parameters() if p.requires_grad]
        loss, metrics = trainer.recipe.student_loss(trainer, batch, rank)
        ref, ref_metrics = reference_student_loss(trainer.parts, batch, cfg, trainer.step, rank)
        torch.testing.assert_close(loss, ref, rtol=2e-5, atol=1e-9)
        for k in ("dm_size", "ca_size"):
            torch.testing.assert_close(metrics[k], ref_metrics[k], rtol=2e-5, atol=1e-9)
            assert metrics[k] > 0
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        ref_grads = torch.autograd.grad(ref, params, allow_unused=True)
        for g, r in zip(grads, ref_grads):
            if r is not None:
                torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5 * float(r.abs().max()))
        for j in (0, 1):
            fake = trainer.recipe.fake_loss(trainer, j, batch, rank)
            torch.testing.assert_close(fake, reference_fake_loss(trainer.parts, batch, cfg, trainer.step, rank, j),
                                       rtol=2e-5, atol=1e-9)
    trainer.close()


def test_fake_score_starts_as_the_teacher_and_the_ca_term_vanishes_without_guidance(teacher):
    trainer = Trainer(distill_config(teacher, guidance=1.0))
    batch = trainer.data.batch(0, 0, 1)
    loss, metrics = trainer.recipe.student_loss(trainer, batch, 0)
    assert metrics["dm_size"] == 0  # fake and teacher: the same weights, the same inputs
    assert metrics["ca_size"] < 1e-5 and loss < 1e-9
    trainer.close()


def test_distillation_resumes_to_the_uninterrupted_run(teacher, tmp_path):
    sets = ["checkpoint.every=2", "logging.every=1"]
    ref = Trainer(distill_config(teacher, *sets), out_dir=str(tmp_path / "ref"))
    ref.train(max_steps=6)
    cut = Trainer(distill_config(teacher, *sets), out_dir=str(tmp_path / "cut"))
    cut.train(max_steps=5)  # checkpoints at 2, 4 and 5; drop 5 as if the process died after step 5
    cut.close()
    import shutil

    shutil.rmtree(tmp_path / "cut" / "checkpoints" / "step_5")
    resumed = Trainer(distill_config(teacher, *sets), out_dir=str(tmp_path / "cut"), resume=True)
    assert resumed.step == 4
    resumed.train(max_steps=6)
    for name in ("model", "fake"):
        a, b = ref.parts[name], resumed.parts[name]
        for (k, p), q in zip(a.model.named_parameters(), b.model.parameters()):
            assert torch.equal(p, q), (name, k)
        sa, sb = a.optimizer.state_dict()["state"], b.optimizer.state_dict()["state"]
        assert sa.keys() == sb.keys() and all(torch.equal(sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"]) for i in sa)
    assert all(torch.equal(x, y) for x, y in zip(ref.ema.shadow, resumed.ema.shadow))
    assert not torch.equal(ref.parts["fake"].model.img_in.weight, ref.parts["teacher"].model.img_in.weight)
    ref.close()
    resumed.close()


class TwoModels(Recipe):
    """A recipe from outside the library: two models trained with the flow-matching loss
    by their own optimisers (the second at half the learning rate), one frozen copy."""

    name = "pretrain"

    def build(self, trainer, model, folder):
        super().build(trainer, model, folder)
        trainer.add_part("second", trainer.build(), lr_scale=0.5)
        trainer.add_part("frozen", trainer.build(trainable=False, dtype="bfloat16"), trainable=False)

    def update(self, trainer):
        batches = list(trainer.micro_batches())
        loss, norm, _ = trainer.optimize(trainer.parts["model"], trainer.compute_loss, batches)
        second = trainer.parts["second"]

        def second_loss(batch, rank):
            out = trainer.parts["second"].model(batch.latents, batch.text, batch.text_mask,
                                                torch.full((batch.size,), 0.5), batch.img_shapes).sample
            return (out.float() ** 2).mean(), {"second_mean": out.detach().float().mean()}
        second_value, second_norm, extra = trainer.optimize(second, second_loss, batches)
        return {"loss": loss, "grad_norm": norm, "second_loss": second_value, "second_grad_norm": second_norm,
                **extra}


def test_a_recipe_brings_its_models_update_and_metrics_and_the_loop_checkpoints_them(tmp_path):
    cfg = load_config("tiny-cpu").override(["logging.progress_bar=false", "checkpoint.every=2"])
    trainer = Trainer(cfg, out_dir=str(tmp_path / "run"), recipe=TwoModels())
    frozen = trainer.parts["frozen"].model
    assert all(not p.requires_grad and p.dtype == torch.bfloat16 for p in frozen.parameters())
    before = {k: p.clone() for k, p in frozen.named_parameters()}
    result = trainer.train(max_steps=3)
    assert {"second_loss", "second_loss_avg", "second_grad_norm", "second_mean"} <= set(result.records[-1])
    assert all(torch.equal(before[k], p) for k, p in frozen.named_parameters())
    assert trainer.parts["second"].optimizer.param_groups[0]["lr"] == pytest.approx(0.5 * trainer.lr_at(2))
    from lens_fast.train.checkpoint import saved_keys

    keys = saved_keys(str(tmp_path / "run" / "checkpoints" / "step_3"))
    assert any(k.startswith("second.") for k in keys) and any(k.startswith("second_optim.") for k in keys)
    assert not any(k.startswith("frozen") for k in keys)
    trainer.close()


def test_two_ranks_under_torchrun_match_one_process_with_the_same_global_batch(teacher, tmp_path, train_metrics):
    """FSDP2 on both trained models and the frozen teacher (gloo, CPU): every rank draws
    the same schedule step, so the sharded run follows the one-process run."""
    args = ["--config", "tiny-cpu", "--recipe", "distill", "--teacher", teacher, "--no-progress", "--max-steps", "3",
            "--set", "distill.fake_updates=1", "--set", "logging.every=1", "--set", "distill.teacher_dtype=float32"]
    two = train_metrics(args, tmp_path / "two", ranks=2)
    one = train_metrics(args, tmp_path / "one", "--set", "train.grad_accum=2")
    assert sorted(two) == [1, 2, 3] and two[3]["world"] == 2
    for step, r in one.items():
        for key in ("loss", "fake_loss", "dm_size", "ca_size"):
            assert two[step][key] == pytest.approx(r[key], rel=1e-4), (step, key)
