"""LensPipeline: prompt -> image with the reference's arguments and numbers.

Loads an official diffusers-format folder (``model_index.json`` + ``transformer/``,
``text_encoder/``, ``tokenizer/``, ``vae/``, ``scheduler/``). Sampling follows the
reference exactly: empirical-mu exponential shift, Euler with the step computed in
float32, CFG as one [cond; uncond] batch with the per-token norm rescale, the empty
negative prompt as zero features with an all-False mask. ``guidance_scale == 1`` runs
only the cond half (the rescaled combination equals cond exactly).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Sequence, Tuple, Union

import torch
from tqdm.auto import tqdm

from . import engine as fast_path
from .images import OUTPUT_TYPES, decoded_to_output
from .errors import InvalidValue, MissingFile
from .lora import LoraLoaderMixin
from .models.config import read_json
from .models.loading import check_component_files, resolve_dtype
from .models.transformer import LensTransformer2DModel
from .resolutions import resolve_resolution
from .sampling import cfg_combine, lens_sigmas
from .vae import LensVAE

# Recommended settings per variant: (steps, guidance).
VARIANT_DEFAULTS = {"lens": (20, 5.0), "lens-turbo": (4, 1.0), "lens-base": (20, 5.0)}
CALLBACK_TENSORS = ("latents", "prompt_embeds", "negative_prompt_embeds", "noise_pred")


def detect_variant(folder: str) -> str:
    """The variant of a checkpoint folder (a root or its transformer/): ``_lens_variant``
    in ``model_index.json`` (written by lens_fast's exports), else "lens-turbo" when the
    folder's name says turbo (``microsoft/Lens-Turbo``), else "lens"."""
    folder = os.path.normpath(os.fspath(folder))
    root = os.path.dirname(folder) if os.path.basename(folder) == "transformer" else folder
    index_path = os.path.join(root, "model_index.json")
    variant = read_json(index_path).get("_lens_variant") if os.path.isfile(index_path) else None
    if variant is None:
        variant = "lens-turbo" if "turbo" in os.path.basename(root).lower() else "lens"
    if variant not in VARIANT_DEFAULTS:
        raise InvalidValue(f"{index_path}: _lens_variant={variant!r}; expected one of {sorted(VARIANT_DEFAULTS)}")
    return variant


def randn_tensor(shape, generator=None, device=None, dtype=None) -> torch.Tensor:
    """Gaussian noise drawn on the generator's device (one generator per sample when a
    list is given), then moved to ``device``."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}")
        return torch.cat([randn_tensor((1, *shape[1:]), g, device, dtype) for g in generator])
    gen_device = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=gen_device, dtype=dtype).to(device)


@dataclass
class LensPipelineOutput:
    images: Any
    prompts: Optional[List[str]] = None  # what was encoded, one per request: the rewrites with reason=True
    rewrites: Optional[list] = None  # with reason=True: a lens_fast.reasoner.Rewrite per request


def _align(pos: List[torch.Tensor], pos_mask: torch.Tensor, neg: List[torch.Tensor], neg_mask: torch.Tensor):
    """Zero/False-pad positive and negative features to one text length."""
    for name, feats, mask in (("prompt", pos, pos_mask), ("negative_prompt", neg, neg_mask)):
        if not feats:
            raise ValueError(f"{name}_embeds is empty; expected one tensor per selected text-encoder layer")
        b, s = feats[0].shape[:2]
        for i, f in enumerate(feats):
            if f.dim() != 3 or tuple(f.shape[:2]) != (b, s):
                raise ValueError(f"{name}_embeds[{i}] has shape {tuple(f.shape)}; every layer must be [B={b}, S={s}, C]")
        if mask is None or tuple(mask.shape) != (b, s):
            raise ValueError(f"{name}_mask must be [B, S] = [{b}, {s}], got "
                             f"{None if mask is None else tuple(mask.shape)}")
    if len(pos) != len(neg):
        raise ValueError(f"prompt_embeds has {len(pos)} layers but negative_prompt_embeds has {len(neg)}")
    if pos[0].shape[0] != neg[0].shape[0]:
        raise ValueError(f"prompt batch {pos[0].shape[0]} != negative prompt batch {neg[0].shape[0]}")
    target = max(pos[0].shape[1], neg[0].shape[1])

    def pad(feats, mask):
        extra = target - feats[0].shape[1]
        if extra == 0:
            return feats, mask.bool()
        feats = [torch.cat([f, f.new_zeros(f.shape[0], extra, f.shape[2])], 1) for f in feats]
        mask = torch.cat([mask.bool(), torch.zeros(mask.shape[0], extra, dtype=torch.bool, device=mask.device)], 1)
        return feats, mask

    return (*pad(pos, pos_mask), *pad(neg, neg_mask))


class LensPipeline(LoraLoaderMixin):
    """Text-to-image with Lens. Build with :meth:`from_pretrained` or from components.

    ``engine``: the inference engine (``lens_fast.engine.LensEngine``) once
    ``enable_fast_path`` switched it on; ``denoise`` and ``postprocess`` hand over to it.
    ``text_encoding``: the prompt cache / text-encoder offload (``lens_fast.engine.text``)
    in front of the text encoder, used by ``_encode``. None is the reference path.
    LoRA adapters: ``load_lora_weights`` and the rest of diffusers' LoRA methods
    (``lens_fast.lora.LoraLoaderMixin``)."""

    def __init__(self, transformer: LensTransformer2DModel, vae, text_encoder=None, scheduler_config=None,
                 variant: str = "lens", reasoner=None):
        if variant not in VARIANT_DEFAULTS:
            raise ValueError(f"variant={variant!r}; expected one of {sorted(VARIANT_DEFAULTS)}")
        self.transformer = transformer
        self.vae = vae
        self.text_encoder = text_encoder
        self.scheduler_config = dict(scheduler_config or {})
        self.variant = variant
        self.reasoner = reasoner  # a lens_fast.reasoner.Reasoner: rewrites requests when called with reason=True
        self.default_sample_size = 1024
        self._progress = {}
        self.engine = None
        self.text_encoding = None

    # -- construction -------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, folder: str, torch_dtype=None, device="cpu", variant: Optional[str] = None,
                        template_date: Optional[str] = None, text_encoder_dtype=None,
                        quantization: Optional[str] = None, reasoner=None):
        """Load every component of a checkpoint folder. ``variant`` (lens, lens-turbo,
        lens-base) sets the recommended steps/guidance; by default it is read from
        ``model_index.json`` (``_lens_variant``) or the folder name. ``quantization="fp8"``
        turns on the opt-in FP8 linear layers (``lens_fast.quant``). ``reasoner``: a
        ``lens_fast.reasoner.Reasoner``, or "local" / "api" for one with the default system
        prompt (``lens_fast.reasoner.build_reasoner`` takes the other options)."""
        if quantization not in (None, "fp8"):
            raise InvalidValue(f"quantization={quantization!r}; expected None or 'fp8'")
        folder = os.fspath(folder)
        index_path = os.path.join(folder, "model_index.json")
        if not os.path.isfile(index_path):
            raise MissingFile(f"{folder} is not a Lens checkpoint folder: model_index.json is missing")
        index = read_json(index_path)

        def present(name):
            entry = index.get(name)
            return isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[0] is not None

        components = ("transformer", "vae", "scheduler") + (("text_encoder", "tokenizer") if present("text_encoder")
                                                             else ())
        for name in components:
            if not present(name):
                raise InvalidValue(f"{index_path} has no {name} component; a Lens pipeline needs one")
            if not os.path.isdir(os.path.join(folder, name)):
                raise MissingFile(f"{folder} is missing the {name}/ folder named in model_index.json")
        sched_path = os.path.join(folder, "scheduler", "scheduler_config.json")
        if not os.path.isfile(sched_path):
            raise MissingFile(f"missing {sched_path}")
        scheduler_config = read_json(sched_path)
        check_component_files(folder, components)  # every component's files, before any of them loads
        dtype = resolve_dtype(torch_dtype)
        transformer = LensTransformer2DModel.from_pretrained(os.path.join(folder, "transformer"),
                                                             torch_dtype=dtype, device=device)
        vae = LensVAE.from_pretrained(folder, "vae", torch_dtype=dtype, device=device)
        text_encoder = None
        if present("text_encoder"):
            from .text_encoder import LensTextEncoder
            text_encoder = LensTextEncoder.from_pretrained(
                folder, transformer.config.selected_layer_index,
                torch_dtype=resolve_dtype(text_encoder_dtype) or dtype, device=device, template_date=template_date)
        if variant is None:
            variant = detect_variant(folder)
        if isinstance(reasoner, str):
            from .reasoner import build_reasoner

            reasoner = build_reasoner(reasoner, text_encoder)
        pipe = cls(transformer, vae, text_encoder, scheduler_config, variant=variant, reasoner=reasoner)
        if quantization is not None:
            from .quant import apply_quantization

            apply_quantization(pipe, quantization)
        return pipe

    def enable_fast_path(self, **kwargs):
        """Switch to the inference engine (fused ops, compiled blocks, CUDA graphs);
        same arguments and results within bf16 noise. See ``lens_fast.engine``."""
        self.transformer.fuse_projections()  # w1|w3 as one GEMM; state-dict names unchanged
        return fast_path.enable_fast_path(self, **kwargs)

    def disable_fast_path(self):
        return fast_path.disable_fast_path(self)

    def enable_text_encoder_offload(self, mode: str = "model"):
        """Keep the text encoder off the GPU between encodings (``mode="sequential"``
        streams it layer by layer, for GPUs smaller than the encoder)."""
        return fast_path.enable_text_encoder_offload(self, mode=mode)

    def to(self, device=None, dtype=None):
        dtype = resolve_dtype(dtype)
        self.transformer.to(device=device, dtype=dtype)
        self.vae.to(device=device, dtype=dtype)
        if self.text_encoder is not None:
            self.text_encoder.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return self.transformer.device

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.dtype

    def set_progress_bar_config(self, **kwargs):
        self._progress.update(kwargs)

    @property
    def recommended(self) -> Tuple[int, float]:
        return VARIANT_DEFAULTS[self.variant]

    # -- text ---------------------------------------------------------------------------
    def _encode(self, prompts: List[str], max_sequence_length: int, device):
        if self.text_encoder is None:
            raise ValueError("this pipeline has no text encoder (model_index.json lists none); "
                             "pass prompt_embeds and prompt_mask instead of a prompt")

        def encode():
            feats, mask = self.text_encoder.encode(prompts, max_sequence_length=max_sequence_length, device=device)
            return list(feats), mask.bool()

        if self.text_encoding is None:
            return encode()
        return self.text_encoding(self.text_encoder, prompts, max_sequence_length, device, encode)

    def encode_prompt(self, prompt, negative_prompt="", num_images_per_prompt: int = 1, prompt_embeds=None,
                      prompt_mask=None, negative_prompt_embeds=None, negative_prompt_mask=None,
                      max_sequence_length: int = 512, device=None):
        """Returns ``(prompt_embeds, prompt_mask, negative_prompt_embeds, negative_prompt_mask)``:
        per-layer feature lists [B*n, S, C] and bool masks [B*n, S]. An empty negative
        prompt gives zero features and an all-False mask (it is not encoded)."""
        device = device or self.device
        n = int(num_images_per_prompt)
        if n < 1:
            raise ValueError(f"num_images_per_prompt must be >= 1, got {num_images_per_prompt}")
        if prompt_embeds is None:
            if prompt is None:
                raise ValueError("either prompt or prompt_embeds must be given")
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
            prompt_embeds, prompt_mask = self._encode(prompts, max_sequence_length, device)
            prompt_embeds, prompt_mask = self._repeat(prompt_embeds, prompt_mask, n)
        else:
            if prompt_mask is None:
                raise ValueError("prompt_mask must be given with prompt_embeds")
            prompt_embeds = list(prompt_embeds) if isinstance(prompt_embeds, (list, tuple)) else [prompt_embeds]
        batch = prompt_embeds[0].shape[0]
        if negative_prompt_embeds is None:
            negatives = [negative_prompt] * (batch // n) if isinstance(negative_prompt, str) or negative_prompt is None \
                else list(negative_prompt)
            if len(negatives) == 1:
                negatives = negatives * (batch // n)
            if len(negatives) * n != batch:
                raise ValueError(f"negative_prompt has {len(negatives)} entries for {batch // n} prompts")
            if all(neg is None or not str(neg).strip() for neg in negatives):
                negative_prompt_embeds = [torch.zeros_like(f) for f in prompt_embeds]
                negative_prompt_mask = torch.zeros(prompt_mask.shape, dtype=torch.bool, device=prompt_mask.device)
            else:
                negative_prompt_embeds, negative_prompt_mask = self._encode(
                    [neg or "" for neg in negatives], max_sequence_length, device)
                negative_prompt_embeds, negative_prompt_mask = self._repeat(negative_prompt_embeds,
                                                                            negative_prompt_mask, n)
        else:
            if negative_prompt_mask is None:
                raise ValueError("negative_prompt_mask must be given with negative_prompt_embeds")
            negative_prompt_embeds = list(negative_prompt_embeds) if isinstance(
                negative_prompt_embeds, (list, tuple)) else [negative_prompt_embeds]
        return prompt_embeds, prompt_mask, negative_prompt_embeds, negative_prompt_mask

    @staticmethod
    def _repeat(feats, mask, n):
        if n == 1:
            return feats, mask
        return [f.repeat_interleave(n, 0) for f in feats], mask.repeat_interleave(n, 0)

    # -- sampling -----------------------------------------------------------------------
    def _resolve_size(self, height, width, base_resolution, aspect_ratio):
        if base_resolution is not None or aspect_ratio is not None:
            if base_resolution is None or aspect_ratio is None:
                raise ValueError("base_resolution and aspect_ratio must be given together")
            return resolve_resolution(base_resolution, aspect_ratio)
        height = self.default_sample_size if height is None else height
        width = self.default_sample_size if width is None else width
        f = self.vae.spatial_factor
        for name, v in (("height", height), ("width", width)):
            if not isinstance(v, int) or v <= 0 or v % f:
                raise ValueError(f"{name}={v!r} must be a positive multiple of {f}")
        return height, width

    def denoise(self, latents, feats, mask, grid: Tuple[int, int], num_inference_steps: int, guidance_scale: float,
                callback_on_step_end=None, callback_on_step_end_tensor_inputs=("latents",), extra=None,
                mu: Optional[float] = None):
        """The sampling loop on token latents [B, N, C]; ``feats``/``mask`` hold the
        cond rows and, when CFG runs, the uncond rows after them. Runs on the engine when
        the fast path is on."""
        if self.engine is not None:
            return self.engine.denoise(latents, feats, mask, grid, num_inference_steps, guidance_scale,
                                       callback_on_step_end, callback_on_step_end_tensor_inputs, extra, mu)
        h, w = grid
        batch = latents.shape[0]
        use_cfg = guidance_scale != 1.0
        sigmas, timesteps = lens_sigmas(num_inference_steps, h * w, device=latents.device, mu=mu)
        img_shapes = [(1, h, w)]
        bar = tqdm(total=num_inference_steps, **{"disable": False, "leave": False, **self._progress})
        for i, t in enumerate(timesteps):
            x_in = latents.repeat(2, 1, 1) if use_cfg else latents
            timestep = t.expand(x_in.shape[0]).to(latents.dtype) / 1000
            out = self.transformer(hidden_states=x_in, encoder_hidden_states=feats, encoder_hidden_states_mask=mask,
                                   timestep=timestep, img_shapes=img_shapes).sample
            if use_cfg:
                cond, uncond = out[:batch], out[batch:]
                noise_pred = cfg_combine(cond, uncond, guidance_scale)
            else:
                noise_pred = out
            # Scheduler step as the reference: float32 sample, (0-dim fp32 dt) * v in v's
            # dtype, result cast back to the model output's dtype.
            dt = sigmas[i + 1] - sigmas[i]
            latents = (latents.to(torch.float32) + dt * noise_pred).to(noise_pred.dtype)
            if callback_on_step_end is not None:
                available = {"latents": latents, "noise_pred": noise_pred, **(extra or {})}
                cb_out = callback_on_step_end(self, i, t, {k: available[k] for k in callback_on_step_end_tensor_inputs})
                latents = (cb_out or {}).pop("latents", latents)
            bar.update()
        bar.close()
        return latents

    @torch.no_grad()
    def __call__(self, prompt: Union[str, List[str], None] = None, negative_prompt: Union[str, List[str]] = "",
                 height: Optional[int] = None, width: Optional[int] = None, base_resolution: Optional[int] = None,
                 aspect_ratio: Optional[str] = None, num_inference_steps: Optional[int] = None,
                 guidance_scale: Optional[float] = None, num_images_per_prompt: int = 1,
                 generator: Union[torch.Generator, List[torch.Generator], None] = None,
                 latents: Optional[torch.Tensor] = None, prompt_embeds: Optional[List[torch.Tensor]] = None,
                 prompt_mask: Optional[torch.Tensor] = None, negative_prompt_embeds: Optional[List[torch.Tensor]] = None,
                 negative_prompt_mask: Optional[torch.Tensor] = None, output_type: str = "pil",
                 return_dict: bool = True, callback_on_step_end: Optional[Callable] = None,
                 callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",), max_sequence_length: int = 512,
                 mu: Optional[float] = None, reason: bool = False):
        """Text to image with the reference's arguments. ``mu`` (not in the reference)
        overrides the schedule's empirical shift, for models trained at other token counts
        (e.g. the CPU demo); leave it None for Lens checkpoints. ``reason=True`` has the
        pipeline's reasoner rewrite each prompt before encoding (never the negative prompt;
        nothing with ``prompt_embeds``); the output's ``prompts`` and ``rewrites`` say what
        was encoded, and a failed rewrite falls back to the prompt as written."""
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type={output_type!r}; expected one of {OUTPUT_TYPES}")
        for k in callback_on_step_end_tensor_inputs:
            if k not in CALLBACK_TENSORS:
                raise ValueError(f"callback tensor {k!r} is not one of {CALLBACK_TENSORS}")
        height, width = self._resolve_size(height, width, base_resolution, aspect_ratio)
        steps, guidance = self.recommended
        num_inference_steps = steps if num_inference_steps is None else num_inference_steps
        guidance_scale = guidance if guidance_scale is None else float(guidance_scale)
        if not math.isfinite(guidance_scale):
            raise InvalidValue(f"guidance_scale={guidance_scale}: expected a finite number")
        device, dtype = self.device, self.dtype
        use_cfg = guidance_scale != 1.0
        rewrites = None
        if reason and prompt_embeds is None:
            prompt, rewrites = self.rewrite_prompt(prompt, max_sequence_length)
        pe, pm, ne, nm = self.encode_prompt(prompt, negative_prompt if use_cfg else "", num_images_per_prompt,
                                            prompt_embeds, prompt_mask, negative_prompt_embeds, negative_prompt_mask,
                                            max_sequence_length, device)
        if len(pe) != self.transformer.num_text_layers:
            raise ValueError(f"prompt_embeds has {len(pe)} tensors; this model takes "
                             f"{self.transformer.num_text_layers} (selected_layer_index="
                             f"{self.transformer.config.selected_layer_index})")
        pe, pm, ne, nm = _align(pe, pm, ne, nm)
        if use_cfg:
            feats = [torch.cat([p, n], 0).to(device=device, dtype=dtype) for p, n in zip(pe, ne)]
            mask = torch.cat([pm, nm], 0).to(device)
        else:
            feats, mask = [p.to(device=device, dtype=dtype) for p in pe], pm.to(device)
        batch = pe[0].shape[0]
        h, w = self.vae.latent_grid(height, width)
        shape = (batch, h * w, self.transformer.config.in_channels)
        if latents is None:
            latents = randn_tensor(shape, generator, device, dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape} for {height}x{width} and batch {batch}, "
                             f"got {tuple(latents.shape)}")
        latents = latents.to(device=device, dtype=dtype)
        latents = self.denoise(latents, feats, mask, (h, w), num_inference_steps, guidance_scale,
                               callback_on_step_end, callback_on_step_end_tensor_inputs,
                               extra={"prompt_embeds": pe, "negative_prompt_embeds": ne}, mu=mu)
        images = self.postprocess(latents, height, width, output_type)
        if not return_dict:
            return (images,)
        prompts = None if prompt is None else [prompt] if isinstance(prompt, str) else list(prompt)
        return LensPipelineOutput(images=images, prompts=prompts, rewrites=rewrites)

    def rewrite_prompt(self, prompt, max_sequence_length: int = 512):
        """(prompts, rewrites): ``prompt`` (a string or a list) rewritten by the reasoner and
        fitted to the text encoder (``lens_fast.reasoner.rewrite_for_encoder``)."""
        if self.reasoner is None:
            raise ValueError("reason=True needs a reasoner: LensPipeline(..., reasoner=...) or "
                             "from_pretrained(..., reasoner='local'|'api')")
        if prompt is None:
            raise ValueError("reason=True rewrites the prompt, and none was given")
        from .reasoner import rewrite_for_encoder

        return rewrite_for_encoder(self.reasoner, self.text_encoder, prompt, max_sequence_length)

    def postprocess(self, latents, height, width, output_type):
        if self.engine is not None:
            return self.engine.postprocess(latents, height, width, output_type)
        if output_type == "latent":
            return latents
        return decoded_to_output(self.vae.decode(latents, height, width), output_type)
