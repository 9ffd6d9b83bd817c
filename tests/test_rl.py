"""Recipe rl (DiffusionNFT): the objective against a plain-PyTorch reference of the
equations in train/rl.md on a tiny model (with and without CFG), group normalisation,
rollouts through the pipeline's sampler (reference and fast path), the old policy's
soft update, exact resume, and bad input."""
import json
import shutil
import zlib

import numpy as np
import pytest
import torch

from lens_fast import LensTransformer2DModel
from lens_fast.pipeline import LensPipeline
from lens_fast.rl.prompts import build_prompt_set, load_taxonomy
from lens_fast.rl.rewards import NonFiniteReward, RewardResult
from lens_fast.sampling import lens_sigmas
from lens_fast.tiny import randomize_
from lens_fast.train import ConfigError, PixelSpace, Trainer, load_config
from lens_fast.train.loss import step_generator
from lens_fast.train.nft import group_advantages, old_decay, optimality
from lens_fast.train.rl import TRAIN_NOISE, TRAIN_TIMES, RLRecipe
from lens_fast.train.rollout import PromptSource, RolloutSampler, rollout_noise

pytestmark = pytest.mark.usefixtures("one_thread")


class HashText:
    """Text features fixed per word (CRC32-seeded), K layers of ``dim``: a deterministic
    stand-in for a text encoder with its ``encode`` signature."""

    def __init__(self, layers=2, dim=32):
        self.layers, self.dim = layers, dim

    def encode(self, prompts, max_sequence_length=77, device=None):
        words = [p.split()[:max_sequence_length] for p in prompts]
        s = max(len(w) for w in words)
        feats = [torch.zeros(len(prompts), s, self.dim) for _ in range(self.layers)]
        mask = torch.zeros(len(prompts), s, dtype=torch.bool)
        for b, ws in enumerate(words):
            for i, w in enumerate(ws):
                g = torch.Generator().manual_seed(zlib.crc32(w.encode()))
                for k in range(self.layers):
                    feats[k][b, i] = torch.randn(self.dim, generator=g)
                mask[b, i] = True
        return feats, mask


class Redness:
    """A reward with a continuous score: how much red the image holds."""

    name = "redness"

    def score(self, images, prompts, metadata):
        out = []
        for im in images:
            a = np.asarray(im, dtype=np.float32) / 255.0
            out.append(RewardResult(float((a[..., 0] - a[..., 1:].mean(-1)).mean()), {"red": 1.0}))
        return out


class Blueness(Redness):
    """The opposite preference: minus the redness."""

    name = "blueness"

    def score(self, images, prompts, metadata):
        return [RewardResult(-r.score, r.items) for r in super().score(images, prompts, metadata)]


class Poisoned(Redness):
    name = "poisoned"

    def score(self, images, prompts, metadata):
        out = super().score(images, prompts, metadata)
        out[3].score = float("nan")
        return out


@pytest.fixture(scope="module")
def start(tmp_path_factory):
    folder = tmp_path_factory.mktemp("start")
    cfg = load_config("tiny-cpu")
    randomize_(LensTransformer2DModel(**cfg.model.transformer), 3, std=0.08).save_pretrained(
        str(folder / "transformer"))
    return str(folder)


@pytest.fixture(scope="module")
def records():
    return build_prompt_set(load_taxonomy("toy"))


def rl_config(start, *sets):
    cfg = load_config("tiny-cpu")
    cfg.recipe, cfg.model.pretrained = "rl", start
    return cfg.override(["rl.height=16", "rl.width=16", "rl.prompts_per_step=4", "rl.images_per_prompt=4",
                         "rl.sample_steps=4", "rl.timesteps_per_sample=2", "rl.rollout_batch=8",
                         "rl.rollout_dtype=float32", "rl.frozen_dtype=float32", "rl.kl_weight=0.3", "rl.beta=0.7",
                         "rl.adv_clip=2.0", "rl.old_decay=[0, 0.2, 0.5]", "rl.rewards={shapeeval: 1.0}",
                         "logging.progress_bar=false", "optim.warmup_steps=1", *sets])


def make_trainer(start, records, *sets, reward=None, out_dir=None, resume=False):
    cfg = rl_config(start, *sets)
    data = PromptSource(records, HashText(), cfg.rl.prompts_per_step, cfg.train.seed, image_encoder=PixelSpace(4))
    return Trainer(cfg, data=data, recipe=RLRecipe(reward=reward or Redness()), out_dir=out_dir, resume=resume)


# -- the plain reference ---------------------------------------------------------------
def v(model, x, s, text, mask, shapes, guidance):
    def one(t, m):
        return model(x, list(t), m, s, shapes).sample.float()
    cond = one(text, mask)
    if guidance == 1.0:
        return cond
    uncond = one([torch.zeros_like(t) for t in text], torch.zeros_like(mask))
    comb = uncond + guidance * (cond - uncond)
    return comb * cond.norm(dim=-1, keepdim=True) / comb.norm(dim=-1, keepdim=True)


def reference_loss(trainer, x0, text, mask, sigma, noise, r, cfg):
    """DiffusionNFT (train/rl.md): mean(r L+ + (1 - r) L-) / beta + w_KL ||v - v_ref||^2,
    L+- = ||x0(v+-) - x0||^2 / sg(mean |x0(v+-) - x0|), v+ = (1-b) v_old + b v, v- = (1+b) v_old - b v."""
    rl = cfg.rl
    shapes = [(1, 4, 4)]
    s = sigma.view(-1, 1, 1)
    x_t = (1 - s) * x0 + s * noise
    parts = trainer.parts
    vt = v(parts["model"].model, x_t, sigma, text, mask, shapes, rl.guidance)
    with torch.no_grad():
        vo = v(parts["old"].model, x_t, sigma, text, mask, shapes, rl.guidance)
        vr = v(parts["reference"].model, x_t, sigma, text, mask, shapes, rl.guidance)
    b = rl.beta
    losses = []
    for vel in ((1 - b) * vo + b * vt, (1 + b) * vo - b * vt):
        diff = (x_t - s * vel) - x0
        losses.append((diff ** 2).mean(dim=(1, 2)) / diff.detach().abs().mean(dim=(1, 2)))
    policy = (r * losses[0] + (1 - r) * losses[1]).mean() / b
    return policy + rl.kl_weight * ((vt - vr) ** 2).mean()


@pytest.mark.parametrize("guidance", [1.0, 2.5])
def test_nft_objective_matches_a_plain_reference(start, records, guidance):
    trainer = make_trainer(start, records, f"rl.guidance={guidance}")
    trainer.train(max_steps=2)  # policy, old and reference now differ
    recipe, cfg, step = trainer.recipe, trainer.cfg, trainer.step
    prompts = trainer.data.batch(step, 0, 1)
    x0, grid = recipe.rollout(trainer, prompts)
    rewards, _ = recipe.score(trainer, prompts, x0, grid)
    # Group normalisation and r, by hand: rewards minus the group mean over the batch std, clipped, to [0, 1].
    rw = rewards.double().numpy()
    adv = (rw - rw.mean(1, keepdims=True)) / (rw.std() + 1e-4)
    r_ref = 0.5 + 0.5 * np.clip(adv, -cfg.rl.adv_clip, cfg.rl.adv_clip) / cfg.rl.adv_clip
    (rank, batch), = recipe.training_batches(trainer, prompts, x0, grid,
                                             optimality(group_advantages(rewards), cfg.rl.adv_clip))
    t = cfg.rl.timesteps_per_sample
    torch.testing.assert_close(batch.r, torch.from_numpy(np.repeat(r_ref.reshape(-1), t)).float())
    # The training rows: every rollout at t distinct sampler sigmas, fresh noise, keyed by (seed, step, image).
    sigmas, _ = lens_sigmas(cfg.rl.sample_steps, 16)
    for i in range(x0.shape[0]):
        pick = torch.randperm(cfg.rl.sample_steps, generator=step_generator(0, step, i, TRAIN_TIMES, "cpu"))[:t]
        torch.testing.assert_close(batch.sigma[i * t:(i + 1) * t], sigmas[pick])
        noise = torch.randn((t, 16, 48), generator=step_generator(0, step, i, TRAIN_NOISE, "cpu"))
        torch.testing.assert_close(batch.noise[i * t:(i + 1) * t], noise)
    assert len(set(batch.sigma[:t].tolist())) == t and torch.equal(batch.latents[:t], x0[:1].expand(t, -1, -1))
    loss, metrics = recipe.loss(trainer, batch, rank)
    ref = reference_loss(trainer, batch.latents, batch.text, batch.text_mask, batch.sigma, batch.noise, batch.r, cfg)
    torch.testing.assert_close(loss, ref, rtol=2e-5, atol=1e-8)
    assert metrics["kl"] > 0 and metrics["old_deviation"] > 0
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    ref_grads = torch.autograd.grad(ref, params, allow_unused=True)
    assert sum(g is not None for g in grads) > 10
    for g, rg in zip(grads, ref_grads):
        if rg is not None:
            torch.testing.assert_close(g, rg, rtol=1e-4, atol=1e-5 * float(rg.abs().max()) + 1e-12)
    trainer.close()


def test_rl_moves_the_policy_towards_what_the_reward_prefers(start, records):
    """Ten steps on each of two opposite rewards: the images' redness goes up under one and
    down under the other (measured on each step's fresh rollouts)."""
    sets = ["optim.lr=1e-3", "rl.images_per_prompt=8", "rl.kl_weight=0", "logging.every=1"]
    redness = {}
    for reward in (Redness(), Blueness()):
        trainer = make_trainer(start, records, *sets, reward=reward)
        sign = 1 if reward.name == "redness" else -1
        redness[reward.name] = [sign * r["reward"] for r in trainer.train(max_steps=10).records]
        trainer.close()
    up, down = redness["redness"], redness["blueness"]
    assert up[0] == pytest.approx(down[0])  # the same first rollouts
    assert up[-1] > up[0] + 0.1 and down[-1] < down[0] - 0.05, (up, down)


def test_group_normalisation():
    rewards = torch.tensor([[0.0, 1.0, 1.0, 0.0], [0.2, 0.2, 0.2, 0.2], [0.1, 0.5, 0.9, 0.3]])
    r = rewards.double().numpy()
    glob = group_advantages(rewards, global_std=True)
    torch.testing.assert_close(glob, torch.from_numpy((r - r.mean(1, keepdims=True)) / (r.std() + 1e-4)).float())
    own = group_advantages(rewards, global_std=False)
    torch.testing.assert_close(own, torch.from_numpy((r - r.mean(1, keepdims=True))
                                                     / (r.std(1, keepdims=True) + 1e-4)).float())
    assert torch.equal(glob[1], torch.zeros(4)) and torch.equal(own[1], torch.zeros(4))  # one value: no signal
    assert torch.allclose(glob.sum(1), torch.zeros(3), atol=1e-6)  # every group centred on its own mean
    # Shifting a group's rewards changes nothing; scaling all rewards changes nothing (but eps).
    shifted = rewards + torch.tensor([[5.0], [0.0], [0.0]])
    torch.testing.assert_close(group_advantages(shifted, global_std=False), own)
    torch.testing.assert_close(group_advantages(rewards * 10, global_std=False), own, rtol=1e-3, atol=1e-3)
    p = optimality(torch.tensor([-9.0, -1.0, 0.0, 1.0, 9.0]), clip=2.0)
    torch.testing.assert_close(p, torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0]))
    with pytest.raises(ValueError, match="groups, images per group"):
        group_advantages(torch.zeros(4))


def test_rollouts_are_the_pipeline_sampler_and_the_fast_path_matches(start, records):
    trainer = make_trainer(start, records)
    old = trainer.parts["old"].model
    text, mask = HashText().encode(["a red circle", "two squares"])
    noise = rollout_noise(0, 0, 0, 2, (16, 48), "cpu")
    for guidance in (1.0, 3.0):
        reference = RolloutSampler(old, trainer.model_config, False, torch.float32, "cpu")
        fast = RolloutSampler(old, trainer.model_config, True, torch.float32, "cpu")
        fast.sync()
        got = reference.sample(noise, text, mask, (4, 4), 5, guidance)
        pipe = LensPipeline(vae=PixelSpace(4), transformer=old)
        pipe.set_progress_bar_config(disable=True)
        want = pipe(prompt_embeds=text, prompt_mask=mask, latents=noise, height=16, width=16, num_inference_steps=5,
                    guidance_scale=guidance, output_type="latent").images
        torch.testing.assert_close(got, want.float(), rtol=0, atol=0)
        torch.testing.assert_close(fast.sample(noise, text, mask, (4, 4), 5, guidance), got, rtol=1e-4, atol=1e-5)
    with torch.no_grad():  # the fast path's copy follows the old policy only through sync
        for p in old.parameters():
            p.mul_(0.5)
    assert not torch.allclose(fast.sample(noise, text, mask, (4, 4), 5, 3.0), reference.sample(noise, text, mask,
                                                                                                (4, 4), 5, 3.0))
    fast.sync()
    torch.testing.assert_close(fast.sample(noise, text, mask, (4, 4), 5, 3.0),
                               reference.sample(noise, text, mask, (4, 4), 5, 3.0), rtol=1e-4, atol=1e-5)
    trainer.close()


def test_old_policy_soft_update_and_rollouts_follow_it(start, records):
    trainer = make_trainer(start, records)
    trainer.train(max_steps=1)
    old = {k: p.clone() for k, p in trainer.parts["old"].model.named_parameters()}
    assert all(torch.equal(old[k], p) for k, p in trainer.model.named_parameters())  # decay 0 at step 0: on-policy
    trainer.train(max_steps=2)
    d = old_decay(1, 0, 0.2, 0.5)
    assert d == pytest.approx(0.2)
    policy = dict(trainer.model.named_parameters())
    for k, p in trainer.parts["old"].model.named_parameters():
        torch.testing.assert_close(p, d * old[k] + (1 - d) * policy[k])
    assert not torch.equal(trainer.parts["old"].model.img_in.weight, trainer.model.img_in.weight)
    # The next rollouts are the old policy's (the engine's copy follows it), from noise keyed by image index.
    prompts = trainer.data.batch(trainer.step, 0, 1)
    x0, grid = trainer.recipe.rollout(trainer, prompts)
    k = trainer.cfg.rl.images_per_prompt
    reference = RolloutSampler(trainer.parts["old"].model, trainer.model_config, False, torch.float32, "cpu")
    want = reference.sample(rollout_noise(0, trainer.step, 0, 4 * k, (16, 48), "cpu"),
                            [t.repeat_interleave(k, 0) for t in prompts.text],
                            prompts.text_mask.repeat_interleave(k, 0), grid, 4, 1.0)
    torch.testing.assert_close(x0, want, rtol=1e-4, atol=1e-5)
    ref = trainer.parts["reference"].model  # the reference stays the start
    assert torch.equal(ref.img_in.weight, LensTransformer2DModel.from_pretrained(start + "/transformer").img_in.weight)
    trainer.close()


def test_rl_resumes_to_the_uninterrupted_run(start, records, tmp_path):
    sets = ["checkpoint.every=2", "logging.every=1"]
    ref = make_trainer(start, records, *sets, out_dir=str(tmp_path / "ref"))
    ref.train(max_steps=6)
    cut = make_trainer(start, records, *sets, out_dir=str(tmp_path / "cut"))
    cut.train(max_steps=5)
    cut.close()
    shutil.rmtree(tmp_path / "cut" / "checkpoints" / "step_5")  # as if the process died after step 5
    resumed = make_trainer(start, records, *sets, out_dir=str(tmp_path / "cut"), resume=True)
    assert resumed.step == 4
    resumed.train(max_steps=6)
    for name in ("model", "old"):
        for (k, p), q in zip(ref.parts[name].model.named_parameters(), resumed.parts[name].model.parameters()):
            assert torch.equal(p, q), (name, k)
    sa, sb = ref.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    assert sa.keys() == sb.keys() and all(torch.equal(sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"]) for i in sa)
    assert all(torch.equal(x, y) for x, y in zip(ref.ema.shadow, resumed.ema.shadow))
    assert torch.equal(ref.recipe.last["rewards"], resumed.recipe.last["rewards"])  # rollouts and prompts too

    def rewards(run):
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return {r["step"]: r["reward"] for r in map(json.loads, lines) if "reward" in r}
    assert rewards("ref")[6] == rewards("cut")[6] and rewards("ref")[5] == rewards("cut")[5]
    from lens_fast.train.checkpoint import saved_keys

    keys = saved_keys(str(tmp_path / "cut" / "checkpoints" / "step_6"))
    assert any(k.startswith("old.") for k in keys) and not any(k.startswith("reference") for k in keys)
    ref.close()
    resumed.close()


def test_non_finite_rewards_are_refused_naming_the_prompt(start, records):
    trainer = make_trainer(start, records, reward=Poisoned())
    first = trainer.data.batch(0, 0, 1).records[0]["prompt"]  # image 3 belongs to the first prompt (K = 4)
    with pytest.raises(NonFiniteReward, match=f"poisoned gave nan for image 3 of prompt '{first}'"):
        trainer.train(max_steps=1)
    trainer.close()


def test_bad_rl_settings_are_refused_before_anything_runs(start, records, tmp_path):
    with pytest.raises(ConfigError, match="rl.images_per_prompt=1: expected >= 2"):
        rl_config(start, "rl.images_per_prompt=1")
    with pytest.raises(ConfigError, match="rl.timesteps_per_sample=9 exceeds rl.sample_steps=4"):
        rl_config(start, "rl.timesteps_per_sample=9")
    with pytest.raises(ConfigError, match="rl.rewards"):
        rl_config(start, "rl.rewards={}")
    with pytest.raises(ValueError, match="recipe rl needs a prompt set"):
        Trainer(rl_config(start), out_dir=str(tmp_path / "a"))
    with pytest.raises(ValueError, match="needs the policy to start from"):
        Trainer(rl_config(None, "rl.prompts=x.jsonl"))
    with pytest.raises(ValueError, match="train.grad_accum=5 does not divide this rank's 32 training rows"):
        make_trainer(start, records, "train.grad_accum=5")
    assert not (tmp_path / "a").exists()
