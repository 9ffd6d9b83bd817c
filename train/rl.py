"""Recipe ``rl``: online RL of a Lens policy with DiffusionNFT on the trainer's one loop
(method, equations and sources: ``train/rl.md``; the math: ``train/nft.py``).

Models, all through the trainer's one build path, all from ``model.pretrained``: the
policy (primary: trained with AdamW, EMA'd, exported), the old policy (frozen, in
``rl.frozen_dtype``, soft-updated towards the policy after every step and checkpointed:
it samples the rollouts and anchors the implicit policies) and, with ``rl.kl_weight`` >
0, the reference policy (frozen, never checkpointed: reloaded from its folder, whose
fingerprint a resume checks).

One trainer step: this rank's share of ``rl.prompts_per_step`` prompts (the data
source), ``rl.images_per_prompt`` rollouts each by the old policy through the
pipeline's sampler (``train/rollout.py``), decoded and scored by the reward, rewards
normalised within each prompt's group over all ranks, then one policy update on
``rl.timesteps_per_sample`` noised copies of every rollout at the sampler's own sigmas,
then the old policy's soft update.
"""
from __future__ import annotations

import importlib
import os
import time
from functools import partial
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

from lens_fast.pipeline import decoded_to_output
from lens_fast.rl.rewards import RewardError, checked
from lens_fast.sampling import add_noise, lens_sigmas

from .build import folder_fingerprint, model_folder
from .data import Batch
from .distill import _broadcast
from .loss import step_generator
from .nft import group_advantages, nft_loss, old_decay, optimality, policy_velocity, soft_update
from .parallel import dtype_of, local, reshard
from .recipe import Recipe
from .rollout import PromptSource, RolloutSampler, named_rewrite, rollout_noise

TRAIN_TIMES, TRAIN_NOISE = 33, 34  # generator streams of the training times and noise (per rollout image)


class RolloutBatch(Batch):
    """Training rows: clean rollouts (``latents``) with their text, and per row the
    training sigma, the noise and the optimality probability r."""

    def __init__(self, latents, text, text_mask, grid, sigma, noise, r):
        super().__init__(latents, text, text_mask, grid)
        self.sigma, self.noise, self.r = sigma, noise, r


class RLRecipe(Recipe):
    name = "rl"

    def __init__(self, reward=None):
        self.reward = reward  # None: built from rl.rewards

    def start_folder(self, cfg) -> Optional[str]:
        if not cfg.model.pretrained:
            raise ValueError("recipe rl needs the policy to start from: --pretrained FOLDER (model.pretrained), a "
                             "Lens checkpoint folder or an exported transformer folder")
        self.start_root = os.path.abspath(cfg.model.pretrained)
        self.start = model_folder(cfg.model.pretrained, "--pretrained")
        return self.start

    def prepare(self, trainer) -> dict:
        cfg, r = trainer.cfg, trainer.cfg.rl
        self.records = None
        if trainer.data is None:
            from lens_fast.rl.prompts import load_prompt_set

            if not r.prompts:
                raise ValueError("recipe rl needs a prompt set: --set rl.prompts=FILE (build one with lens-fast "
                                 "rl-prompts)")
            self.records = load_prompt_set(r.prompts)
        if self.reward is None and "judge" in r.rewards:
            from lens_fast.chat_api import ChatEndpoint

            try:  # the endpoint is configured: fail now, not at the first step
                ChatEndpoint.from_env(r.judge_env, **r.judge_options)
            except TypeError as e:
                raise ValueError(f"rl.judge_options={r.judge_options!r}: {e}") from None
        if r.prompts_per_step % trainer.dist.world:
            raise ValueError(f"rl.prompts_per_step={r.prompts_per_step} must be a multiple of the {trainer.dist.world} "
                             "ranks (each rank rolls out whole prompt groups)")
        rows = r.prompts_per_step // trainer.dist.world * r.images_per_prompt * r.timesteps_per_sample
        if rows % cfg.train.grad_accum:
            raise ValueError(f"train.grad_accum={cfg.train.grad_accum} does not divide this rank's {rows} training "
                             "rows (prompts per rank x images per prompt x timesteps per sample)")
        fingerprint = _broadcast(folder_fingerprint(self.start) if trainer.dist.is_main else None,
                                 trainer.dist.is_main)
        self.record = {"name": self.name, "start": self.start_root, "start_fingerprint": fingerprint,
                       "rewards": self.reward.name if self.reward is not None else dict(r.rewards)}
        return self.record

    def check_resume(self, saved: Optional[dict], run_dir: str) -> None:
        super().check_resume(saved, run_dir)
        for key, what in (("start_fingerprint", "started from other weights"), ("rewards", "used other rewards")):
            if saved.get(key) != self.record[key]:
                raise ValueError(f"--resume into {run_dir}: its run {what} ({saved.get(key)}; this run: "
                                 f"{self.record[key]}). Resume with the same --pretrained and rl.rewards or use a "
                                 "new --out")

    def build(self, trainer, model, folder) -> None:
        cfg, r = trainer.cfg, trainer.cfg.rl
        if model is not None:
            raise ValueError("recipe rl builds the policy, the old and the reference policy from model.pretrained "
                             "(--pretrained); pass no model")
        trainer.add_part("model", trainer.build(folder=folder), ema=cfg.ema.enabled)
        self.frozen_dtype = dtype_of(r.frozen_dtype)
        old = trainer.build(folder=self.start, trainable=False, dtype=r.frozen_dtype)
        trainer.add_part("old", old, trainable=False, stateful=True)
        if r.kl_weight > 0:
            ref = trainer.build(folder=self.start, trainable=False, dtype=r.frozen_dtype)
            trainer.add_part("reference", ref, trainable=False)
        self.sampler = RolloutSampler(old, trainer.model_config, r.fast_rollouts, dtype_of(r.rollout_dtype),
                                      trainer.device)
        if self.reward is None:
            from lens_fast.rl.registry import build_reward

            cache = os.path.join(trainer.run_dir, "judge_cache") if trainer.run_dir else None
            self.reward = build_reward(r.rewards, r.judge_env, cache, r.judge_options)
        self.last: Dict = {}

    def data_source(self, trainer) -> PromptSource:
        from .builders import build_image_encoder, build_text_encoder

        cfg = trainer.cfg
        if cfg.encoders.text_encoder == "minilm":  # the toy world's encoder, loaded by name (a floor above)
            toy_text = importlib.import_module("lens_fast.toy.text")
            encoder = toy_text.MiniLMTextEncoder(trainer.model_config["selected_layer_index"])
        else:
            encoder = build_text_encoder(cfg, trainer.model_config, trainer.device)
        return PromptSource(self.records, encoder, cfg.rl.prompts_per_step, cfg.train.seed,
                            named_rewrite(cfg.rl.rewrite), cfg.rl.max_text_tokens,
                            build_image_encoder(cfg, trainer.device))

    # -- one step -------------------------------------------------------------------------
    def update(self, trainer) -> Dict[str, torch.Tensor]:
        r, dev = trainer.cfg.rl, trainer.device
        t0 = time.perf_counter()
        prompts = trainer.data.batch(trainer.step, trainer.dist.rank, trainer.dist.world).to(dev)
        x0, grid = self.rollout(trainer, prompts)
        t1 = time.perf_counter()
        rewards, results = self.score(trainer, prompts, x0, grid)
        t2 = time.perf_counter()
        everyone = self._gather(rewards)
        advantages = group_advantages(everyone, r.global_std)
        mine = advantages.view(trainer.dist.world, -1, r.images_per_prompt)[trainer.dist.rank]
        batches = self.training_batches(trainer, prompts, x0, grid, optimality(mine, r.adv_clip))
        n_txt = prompts.text_mask.shape[1]
        trainer.throughput.add(x0.shape[0], x0.shape[1], n_txt, forwards=self.forwards(trainer.cfg))
        loss, norm, metrics = trainer.optimize(trainer.parts["model"], partial(self.loss, trainer), batches)
        decay = old_decay(trainer.step, *trainer.cfg.rl.old_decay)
        for part in ("model", "old"):
            reshard(trainer.parts[part].model)
        soft_update([local(p) for p in trainer.parts["old"].model.parameters()],
                    [local(p.detach()) for p in trainer.model.parameters()], decay)
        t3 = time.perf_counter()
        spread = everyone.std(dim=1, unbiased=False)
        self.last = {"step": trainer.step, "records": prompts.records, "texts": prompts.texts, "rewards": rewards,
                     "results": results}
        self.last_times = {"rollout_s": t1 - t0, "reward_s": t2 - t1, "update_s": t3 - t2}
        times = {k: torch.tensor(v) for k, v in self.last_times.items()}
        return {"loss": loss, "grad_norm": norm, "reward": everyone.mean(), "reward_std": everyone.std(),
                "zero_std_groups": (spread < 1e-6).float().mean(), "advantage_abs": mine.abs().mean(),
                "old_decay": torch.tensor(decay), **times, **metrics}

    def rollout(self, trainer, prompts):
        """The old policy's rollouts: ``images_per_prompt`` per prompt, starting noise keyed by
        (seed, step, image index j * K + k). Returns (clean latents [G_l * K, N, C], grid)."""
        r, dev = trainer.cfg.rl, trainer.device
        self.sampler.sync()  # the old policy as it is now (soft-updated, or restored by a resume)
        grid = trainer.decoder.latent_grid(r.height, r.width)
        k = r.images_per_prompt
        text = [t.repeat_interleave(k, 0) for t in prompts.text]
        mask = prompts.text_mask.repeat_interleave(k, 0)
        channels = trainer.model_config["in_channels"]
        first = [j * k for j in prompts.indices]
        noise = torch.cat([rollout_noise(trainer.cfg.train.seed, trainer.step, f, k, (grid[0] * grid[1], channels),
                                         dev) for f in first])
        out = []
        for s in range(0, noise.shape[0], r.rollout_batch):
            sl = slice(s, s + r.rollout_batch)
            out.append(self.sampler.sample(noise[sl], [t[sl] for t in text], mask[sl], grid, r.sample_steps,
                                           r.guidance, r.sample_mu))
        return torch.cat(out), grid

    def images(self, trainer, x0: torch.Tensor, grid) -> List:
        f = trainer.decoder.spatial_factor
        with torch.no_grad():
            return decoded_to_output(trainer.decoder.decode(x0, grid[0] * f, grid[1] * f), "pil")

    def score(self, trainer, prompts, x0, grid):
        """Rewards [G_l, K] of this rank's rollouts (NaN / inf refused, naming the prompt)."""
        k = trainer.cfg.rl.images_per_prompt
        records = [rec for rec in prompts.records for _ in range(k)]
        texts = [rec["prompt"] for rec in records]
        try:
            results = self.reward.score(self.images(trainer, x0, grid), texts, records)
        except RewardError as e:
            raise RewardError(f"step {trainer.step + 1}: {e}; the run stopped at its last checkpoint: rerun with "
                              "--resume to continue") from e
        results = checked(self.reward.name, results, texts)
        rewards = torch.tensor([float(res.score) for res in results], dtype=torch.float32, device=x0.device)
        return rewards.view(-1, k), results

    @staticmethod
    def _gather(rewards: torch.Tensor) -> torch.Tensor:
        """Every rank's [G_l, K] rewards as one [G, K] tensor, rank-major."""
        if not (dist.is_initialized() and dist.get_world_size() > 1):
            return rewards
        out = [torch.empty_like(rewards) for _ in range(dist.get_world_size())]
        dist.all_gather(out, rewards.contiguous())
        return torch.cat(out)

    def training_batches(self, trainer, prompts, x0, grid, r_opt) -> List:
        """(data_rank, RolloutBatch) micro-batches: every rollout at ``timesteps_per_sample``
        distinct sigmas of the sampler's schedule (drawn per image), fresh noise each."""
        cfg, dev = trainer.cfg, trainer.device
        rl, seed, step = cfg.rl, cfg.train.seed, trainer.step
        k, t = rl.images_per_prompt, rl.timesteps_per_sample
        sigmas, _ = lens_sigmas(rl.sample_steps, x0.shape[1], mu=rl.sample_mu)
        rows_sigma, rows_noise = [], []
        for j in prompts.indices:
            for i in range(j * k, (j + 1) * k):
                pick = torch.randperm(rl.sample_steps, generator=step_generator(seed, step, i, TRAIN_TIMES, "cpu"))[:t]
                rows_sigma.append(sigmas[pick])
                rows_noise.append(torch.randn((t, *x0.shape[1:]),
                                              generator=step_generator(seed, step, i, TRAIN_NOISE, "cpu")))
        rows = x0.shape[0] * t
        sigma = torch.cat(rows_sigma).to(dev)
        noise = torch.cat(rows_noise).to(dev)
        latents = x0.repeat_interleave(t, 0)
        text = [f.repeat_interleave(k * t, 0) for f in prompts.text]
        mask = prompts.text_mask.repeat_interleave(k * t, 0)
        r_rows = r_opt.reshape(-1).repeat_interleave(t).to(dev)
        per = rows // trainer.accum
        out = []
        for a in range(trainer.accum):
            sl = slice(a * per, (a + 1) * per)
            out.append((trainer.dist.rank * trainer.accum + a,
                        RolloutBatch(latents[sl], [f[sl] for f in text], mask[sl], grid, sigma[sl], noise[sl],
                                     r_rows[sl])))
        return out

    def loss(self, trainer, batch: RolloutBatch, data_rank: int):
        """DiffusionNFT on one micro-batch of training rows (``nft.nft_loss``)."""
        rl = trainer.cfg.rl
        x_t = add_noise(batch.latents, batch.noise, batch.sigma)
        cond = (batch.text, batch.text_mask, batch.img_shapes, rl.guidance)
        v_theta = policy_velocity(trainer.model, x_t, batch.sigma, *cond)
        with torch.no_grad():
            v_old = policy_velocity(trainer.parts["old"].model, x_t, batch.sigma, *cond, self.frozen_dtype)
            v_ref = None
            if "reference" in trainer.parts:
                v_ref = policy_velocity(trainer.parts["reference"].model, x_t, batch.sigma, *cond, self.frozen_dtype)
        return nft_loss(v_theta, v_old, x_t, batch.latents, batch.sigma, batch.r, rl.beta, rl.adaptive_weight, v_ref,
                        rl.kl_weight)

    def forwards(self, cfg) -> float:
        """Model forwards per rollout image and step (backward = 2 forwards): the sampler's
        steps, then per training time the policy's forward + backward, the old policy's
        and the reference's forward; all doubled by CFG."""
        rl = cfg.rl
        per_time = 3 + 1 + (1 if rl.kl_weight > 0 else 0)
        return (rl.sample_steps + rl.timesteps_per_sample * per_time) * (2 if rl.guidance != 1.0 else 1)

    def sample_settings(self, cfg):
        return cfg.rl.sample_steps, cfg.rl.guidance
