"""What the ``rl`` recipe feeds on: the prompt source (a DataSource of prompt records,
in a fixed order per (seed, step)) and the rollout sampler (the pipeline's own sampler
on the old policy, through the inference engine where it applies).

Every random draw of a step is keyed by (seed, step, global prompt or image index), so a
step's prompts, rewrites and rollouts are the same for any number of ranks and after a
resume: nothing but the step count needs saving.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import numpy as np
import torch

from lens_fast.cli_checks import load_named
from lens_fast.models.transformer import LensTransformer2DModel
from lens_fast.pipeline import LensPipeline

from .data import trim_text
from .loss import step_generator
from .parallel import full_tensor

ROLLOUT_NOISE = 32  # generator stream of the rollouts' starting noise (per image)


@dataclass
class PromptBatch:
    """One rank's prompts of a step (a group of rollouts each)."""

    records: List[dict]  # prompt records (lens_fast.rl.prompts): prompt, rubric, metadata
    indices: List[int]  # each prompt's position j among the step's prompts (its group id)
    texts: List[str]  # what reached the text encoder (the rewrite, when a rewriter is set)
    text: List[torch.Tensor]  # K x [G, S, E]
    text_mask: torch.Tensor  # [G, S] bool

    def to(self, device) -> "PromptBatch":
        return PromptBatch(self.records, self.indices, self.texts, [t.to(device) for t in self.text],
                           self.text_mask.to(device))


@functools.lru_cache(maxsize=8)
def _permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch, 0x21]).permutation(n)


class PromptSource:
    """The RL DataSource: ``prompts_per_step`` prompts per step from a fresh permutation of
    the set per epoch (seed, epoch), dealt to the ranks in turn (``batch(step, rank,
    world)``), rewritten by ``rewrite(prompt, rng)`` when given (rng keyed by (seed, step,
    j)) and encoded by ``text_encoder.encode``. ``image_encoder``: the latent decoder
    rollouts are decoded with (the trainer takes it)."""

    def __init__(self, records: Sequence[dict], text_encoder, prompts_per_step: int, seed: int = 0,
                 rewrite: Optional[Callable[[str, np.random.Generator], str]] = None, max_text_tokens: int = 512,
                 image_encoder=None):
        from lens_fast.rl.prompts import prompt_set_digest

        if not records:
            raise ValueError("the prompt source needs at least one prompt record")
        self.records, self.text_encoder = list(records), text_encoder
        self.prompts_per_step, self.seed = int(prompts_per_step), int(seed)
        self.rewrite, self.max_text_tokens, self.image_encoder = rewrite, max_text_tokens, image_encoder
        self.digest = prompt_set_digest(self.records)

    def order(self, step: int) -> List[int]:
        """The record indices of step ``step``'s prompts, j = 0 .. prompts_per_step - 1."""
        n, g = len(self.records), self.prompts_per_step
        out = []
        for i in range(step * g, (step + 1) * g):
            out.append(int(_permutation(self.seed, i // n, n)[i % n]))
        return out

    def model_text(self, step: int, j: int, prompt: str) -> str:
        if self.rewrite is None:
            return prompt
        return self.rewrite(prompt, np.random.default_rng([self.seed, step, j, 0x2E]))

    def batch(self, step: int, data_rank: int, data_world: int) -> PromptBatch:
        if self.prompts_per_step % data_world:
            raise ValueError(f"rl.prompts_per_step={self.prompts_per_step} does not divide over {data_world} ranks")
        order = self.order(step)
        js = list(range(data_rank, self.prompts_per_step, data_world))
        records = [self.records[order[j]] for j in js]
        texts = [self.model_text(step, j, r["prompt"]) for j, r in zip(js, records)]
        feats, mask = self.text_encoder.encode(texts, max_sequence_length=self.max_text_tokens)
        feats, mask = trim_text([f.float() for f in feats], mask.bool())
        return PromptBatch(records, js, texts, feats, mask)

    def state_dict(self) -> dict:
        return {"digest": self.digest, "prompts": len(self.records)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("digest") not in (None, self.digest):
            raise ValueError(f"the checkpoint was written with another prompt set ({state.get('prompts')} prompts, "
                             f"digest {state.get('digest')}); this run's has {len(self.records)} prompts, digest "
                             f"{self.digest}. Resume with the same rl.prompts or use a new --out")


def named_rewrite(name: Optional[str]) -> Optional[Callable[[str, np.random.Generator], str]]:
    """The rewriter a config names (``rl.rewrite``): None (prompts as written), ``toy`` (the
    toy world's: ``lens_fast.toy.rewrite.layout_rewrite``, loaded by name as it lives a floor
    above the trainer) or ``package.module:function`` taking (prompt, numpy Generator)."""
    if not name:
        return None
    return load_named("lens_fast.toy.rewrite:layout_rewrite" if name == "toy" else name, f"rl.rewrite={name!r}")


def rollout_noise(seed: int, step: int, first: int, count: int, shape, device) -> torch.Tensor:
    """Starting noise [count, *shape] of images first .. first + count - 1 of a step."""
    return torch.cat([torch.randn((1, *shape), generator=step_generator(seed, step, i, ROLLOUT_NOISE, "cpu"))
                      for i in range(first, first + count)]).to(device)


class RolloutSampler:
    """Rollouts of a policy through ``LensPipeline``'s sampler. ``fast``: the inference
    engine (fused ops, per-step tables, compiled blocks and CUDA graphs on a GPU) on an
    unsharded copy of the policy in ``dtype`` (the engine calls the blocks' parts directly,
    which FSDP2 would not unshard), refreshed by ``sync`` (call it before sampling);
    otherwise the reference sampler runs on the policy itself, sharded or not."""

    def __init__(self, policy: LensTransformer2DModel, model_config: dict, fast: bool, dtype: torch.dtype, device):
        self.policy, self.fast = policy, fast
        model = policy
        if fast:
            with torch.device("meta"):
                model = LensTransformer2DModel(**model_config)
            model.to_empty(device=device).to(dtype).eval().requires_grad_(False)
        self.pipe = LensPipeline(transformer=model, lens_defaults=True)
        self.pipe.set_progress_bar_config(disable=True)
        if fast:
            cuda = torch.device(device).type == "cuda"
            self.engine = self.pipe.enable_fast_path(text_bucket=64 if cuda else None, compile_vae=False,
                                                     channels_last=False)

    @torch.no_grad()
    def sync(self) -> None:
        """Copy the policy's current weights into the engine's copy (collective under FSDP)."""
        if not self.fast:
            return
        target = self.pipe.transformer
        full = {k: full_tensor(v.detach()) for k, v in self.policy.state_dict().items()}
        target.load_state_dict({k: v.to(device=target.device, dtype=target.dtype) for k, v in full.items()})
        self.engine.clear()

    @torch.no_grad()
    def sample(self, noise: torch.Tensor, text: List[torch.Tensor], mask: torch.Tensor, grid, steps: int,
               guidance: float, mu: Optional[float] = None) -> torch.Tensor:
        """Clean token latents [B, N, C] (float32) from ``noise`` for the given text."""
        dtype = self.pipe.transformer.dtype
        if guidance != 1.0:
            text = [torch.cat([t, torch.zeros_like(t)]) for t in text]
            mask = torch.cat([mask, torch.zeros_like(mask)])
        return self.pipe.denoise(noise.to(dtype), [t.to(dtype) for t in text], mask, tuple(grid), steps, guidance,
                                 mu=mu).float()
