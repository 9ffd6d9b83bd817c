"""LensPipeline: prompt -> image with the reference's arguments and numbers.

A diffusers ``DiffusionPipeline`` with diffusers' ``LensPipeline`` constructor
(``scheduler, vae, text_encoder, tokenizer, transformer``: diffusers' component classes or
lens_fast's ``LensVAE`` / ``LensTextEncoder``), ``components``, ``to``, offloading hooks,
and ``from_pretrained`` / ``save_pretrained`` (``pipeline_loading``). Sampling follows the
reference exactly: the scheduler's own ``set_timesteps(sigmas=linspace(1, 1/n, n), mu=
empirical mu)`` and ``step`` (so any ``FlowMatchEulerDiscreteScheduler`` config is honoured
as there), CFG as one [cond; uncond] batch with the per-token norm rescale, the empty
negative prompt as zero features with an all-False mask. ``guidance_scale == 1`` runs
only the cond half (the rescaled combination equals cond exactly). Calls that give no
steps / guidance use diffusers' 50 / 4.0; ``pipe.use_recommended_defaults()`` (or
``lens_defaults=True``) switches to the Lens variant's recommended settings.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler
from diffusers.utils import BaseOutput

from . import engine as fast_path
from .errors import InvalidValue
from .images import OUTPUT_TYPES, decoded_to_output
from .lora import LoraLoaderMixin
from .pipeline_loading import COMPONENTS, VARIANT_DEFAULTS, LensPipelineLoading, detect_variant  # noqa: F401 (re-export)
from .resolutions import resolve_resolution
from .sampling import cfg_combine, compute_empirical_mu
from .text_encoder import LensTextEncoder
from .vae import LensVAE

# diffusers' LensPipeline call defaults (steps, guidance); pipe.recommended holds Lens's.
DIFFUSERS_DEFAULTS = (50, 4.0)
# The official Lens scheduler config (microsoft/Lens scheduler/scheduler_config.json): used
# when a pipeline is built without a scheduler.
LENS_SCHEDULER = {"base_image_seq_len": 256, "base_shift": 0.5, "invert_sigmas": False, "max_image_seq_len": 4096,
                  "max_shift": 1.15, "num_train_timesteps": 1000, "shift": 3.0, "shift_terminal": None,
                  "stochastic_sampling": False, "time_shift_type": "exponential", "use_beta_sigmas": False,
                  "use_dynamic_shifting": True, "use_exponential_sigmas": False, "use_karras_sigmas": False}

CALLBACK_TENSORS = ("latents", "prompt_embeds", "negative_prompt_embeds", "noise_pred")


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
class LensPipelineOutput(BaseOutput):
    """diffusers' output: ``out.images``, ``out[0]``, ``out["images"]``, ``out.to_tuple()``."""

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


def _split_vae(vae):
    """(the module diffusers sees as ``vae``, lens_fast's latent codec: ``latent_grid``,
    ``decode(tokens, h, w)``, ``spatial_factor``)."""
    if vae is None:
        return None, None
    if isinstance(vae, LensVAE):
        return vae.vae, vae
    if hasattr(vae, "latent_grid"):  # a codec of lens_fast's own (train.data.PixelSpace)
        return vae, vae
    if hasattr(vae, "bn") and hasattr(vae, "decode"):  # diffusers' AutoencoderKLFlux2
        return vae, LensVAE(vae)
    raise InvalidValue(f"vae is a {type(vae).__name__}; expected diffusers' AutoencoderKLFlux2 or lens_fast's LensVAE")


def _split_text_encoder(text_encoder, tokenizer, selected_layers):
    """(text_encoder module, tokenizer, lens_fast prompt encoder with ``encode``)."""
    if text_encoder is None:
        return None, tokenizer, None
    if not isinstance(text_encoder, torch.nn.Module) and hasattr(text_encoder, "encode"):
        # lens_fast's LensTextEncoder (or another encode(prompts) -> (features, mask) encoder)
        return getattr(text_encoder, "model", text_encoder), getattr(text_encoder, "tokenizer", tokenizer), text_encoder
    if hasattr(text_encoder, "set_selected_layers"):  # diffusers' LensGptOssEncoder, as its pipeline does
        text_encoder.set_selected_layers(list(selected_layers))
    if tokenizer is None:
        return text_encoder, None, None
    return text_encoder, tokenizer, LensTextEncoder(text_encoder, tokenizer, selected_layers)


def _check_fast_path_servable(pipe) -> None:
    """One clear line for what diffusers can set up and the engine does not run: offload
    hooks, attention processors other than lens_fast's, layerwise casting (all of them run
    on the reference path)."""
    from .models.processors import LensAttnProcessor

    hooked = [n for n, m in pipe.components.items() if isinstance(m, torch.nn.Module) and hasattr(m, "_hf_hook")]
    if hooked:
        raise InvalidValue(f"the fast path cannot run with accelerate offload hooks (on {hooked}); call "
                           "pipe.remove_all_hooks() first or stay on the reference path")
    custom = sorted({type(p).__name__ for p in pipe.transformer.attn_processors.values()
                     if not isinstance(p, LensAttnProcessor)})
    if custom:
        raise InvalidValue(f"the fast path runs lens_fast's own attention; the transformer has attention processor(s) "
                           f"{custom}: they run on the reference path (or reset with set_default_attn_processor())")
    if any(getattr(m, "_diffusers_hook", None) is not None for m in pipe.transformer.modules()):
        raise InvalidValue("the fast path does not run diffusers hooks on the transformer (layerwise casting, group "
                           "offloading): they run on the reference path")


def _plain_euler(scheduler) -> bool:
    return isinstance(scheduler, FlowMatchEulerDiscreteScheduler) and not scheduler.config.stochastic_sampling


class LensPipeline(LoraLoaderMixin, LensPipelineLoading, DiffusionPipeline):
    """Text-to-image with Lens: diffusers' ``LensPipeline`` API, lens_fast's engine.

    ``LensPipeline(scheduler, vae, text_encoder, tokenizer, transformer)`` as in diffusers
    (``scheduler`` may also be a config dict or None for the official Lens config; ``vae``
    a ``LensVAE``; ``text_encoder`` a ``LensTextEncoder``, which brings its tokenizer).
    ``prompt_encoder``: the ``LensTextEncoder`` that encodes prompts (chat template, fixed
    ``template_date``, prompt cache). ``latent_codec``: the ``LensVAE`` around ``vae``.
    ``engine``: the inference engine (``lens_fast.engine.LensEngine``) once
    ``enable_fast_path`` switched it on; ``denoise`` and ``postprocess`` hand over to it.
    ``text_encoding``: the prompt cache / text-encoder offload (``lens_fast.engine.text``)
    in front of the text encoder, used by ``_encode``. None is the reference path.
    LoRA adapters: ``load_lora_weights`` and the rest of diffusers' LoRA methods
    (``lens_fast.lora.LoraLoaderMixin``)."""

    model_cpu_offload_seq = "text_encoder->transformer->vae"
    _callback_tensor_inputs = list(CALLBACK_TENSORS)

    def __init__(self, scheduler=None, vae=None, text_encoder=None, tokenizer=None, transformer=None, *,
                 lens_variant: str = "lens", reasoner=None, lens_defaults: bool = False):
        super().__init__()
        if lens_variant not in VARIANT_DEFAULTS:
            raise InvalidValue(f"lens_variant={lens_variant!r}; expected one of {sorted(VARIANT_DEFAULTS)}")
        if scheduler is None or isinstance(scheduler, dict):
            config = {k: v for k, v in (scheduler or LENS_SCHEDULER).items() if not k.startswith("_")}
            scheduler = FlowMatchEulerDiscreteScheduler.from_config(config)
        elif not hasattr(scheduler, "set_timesteps") or not hasattr(scheduler, "step"):
            raise InvalidValue(f"scheduler is a {type(scheduler).__name__}; expected a diffusers scheduler "
                               "(FlowMatchEulerDiscreteScheduler), a config dict or None")
        vae, codec = _split_vae(vae)
        # Without a transformer (a pipeline that only encodes prompts) layer 0, as diffusers' Lens does.
        layers = transformer.config.selected_layer_index if transformer is not None else [0]
        text_encoder, tokenizer, prompt_encoder = _split_text_encoder(text_encoder, tokenizer, layers)
        if tokenizer is not None and getattr(tokenizer, "pad_token_id", 0) is None:
            tokenizer.pad_token = tokenizer.eos_token
        if tokenizer is not None and hasattr(tokenizer, "padding_side"):
            tokenizer.padding_side = "right"
        self.register_modules(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                              transformer=transformer)
        self.latent_codec = codec
        self.prompt_encoder = prompt_encoder
        self.lens_variant = lens_variant
        self.lens_defaults = bool(lens_defaults)
        self.reasoner = reasoner  # a lens_fast.reasoner.Reasoner: rewrites requests when called with reason=True
        self.vae_scale_factor = codec.spatial_factor if codec is not None else 16
        self.latent_channels = transformer.config.in_channels if transformer is not None else None
        self.default_sample_size = 1024
        self.engine = None
        self.text_encoding = None

    @classmethod
    def _get_signature_keys(cls, obj):
        """diffusers reads a pipeline's components off its constructor's required
        arguments; here they may be omitted (None: no text encoder, the Lens scheduler),
        and they are still the five components."""
        return sorted(COMPONENTS), ["lens_defaults", "lens_variant", "reasoner"]

    @property
    def variant(self) -> str:
        """The Lens variant ("lens", "lens-turbo", "lens-base"): picks ``recommended``."""
        return self.lens_variant

    @property
    def recommended(self) -> Tuple[int, float]:
        """Lens's recommended (steps, guidance) for this variant (Turbo: 4 / 1.0)."""
        return VARIANT_DEFAULTS[self.lens_variant]

    @property
    def call_defaults(self) -> Tuple[int, float]:
        """(steps, guidance) of a call that gives none: diffusers' 50 / 4.0, or ``recommended``
        after ``use_recommended_defaults()``."""
        return self.recommended if self.lens_defaults else DIFFUSERS_DEFAULTS

    def use_recommended_defaults(self, enabled: bool = True) -> "LensPipeline":
        """Calls without steps / guidance use ``recommended`` instead of diffusers' 50 / 4.0."""
        self.lens_defaults = bool(enabled)
        return self

    def enable_fast_path(self, **kwargs):
        """Switch to the inference engine (fused ops, compiled blocks, CUDA graphs);
        same arguments and results within bf16 noise. See ``lens_fast.engine``."""
        _check_fast_path_servable(self)
        self.transformer.fuse_projections()  # w1|w3 as one GEMM; state-dict names unchanged
        return fast_path.enable_fast_path(self, **kwargs)

    def disable_fast_path(self):
        return fast_path.disable_fast_path(self)

    def enable_text_encoder_offload(self, mode: str = "model"):
        """Keep the text encoder off the GPU between encodings (``mode="sequential"``
        streams it layer by layer, for GPUs smaller than the encoder)."""
        return fast_path.enable_text_encoder_offload(self, mode=mode)

    @property
    def device(self) -> torch.device:
        """The transformer's device (where sampling runs); without one, diffusers' rule."""
        return self.transformer.device if self.transformer is not None else super().device

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.dtype if self.transformer is not None else super().dtype

    @property
    def _progress(self) -> dict:
        return {"disable": False, "leave": False, **getattr(self, "_progress_bar_config", {})}

    # -- text ---------------------------------------------------------------------------
    def _encode(self, prompts: List[str], max_sequence_length: int, device):
        if self.prompt_encoder is None:
            raise ValueError("this pipeline has no text encoder and tokenizer (model_index.json lists none); "
                             "pass prompt_embeds and prompt_mask instead of a prompt")

        def encode():
            feats, mask = self.prompt_encoder.encode(prompts, max_sequence_length=max_sequence_length, device=device)
            return list(feats), mask.bool()

        if self.text_encoding is None:
            return encode()
        return self.text_encoding(self.prompt_encoder, prompts, max_sequence_length, device, encode)

    def encode_prompt(self, prompt, negative_prompt="", num_images_per_prompt: int = 1, prompt_embeds=None,
                      prompt_mask=None, negative_prompt_embeds=None, negative_prompt_mask=None,
                      max_sequence_length: int = 512, device=None):
        """Returns ``(prompt_embeds, prompt_mask, negative_prompt_embeds, negative_prompt_mask)``:
        per-layer feature lists [B*n, S, C] and bool masks [B*n, S]. An empty negative
        prompt gives zero features and an all-False mask (it is not encoded)."""
        device = device or self._execution_device
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
        f = self.vae_scale_factor
        for name, v in (("height", height), ("width", width)):
            if not isinstance(v, int) or v <= 0 or v % f:
                raise ValueError(f"{name}={v!r} must be a positive multiple of {f}")
        return height, width

    def schedule(self, num_inference_steps: int, image_seq_len: int, mu: Optional[float] = None, device=None):
        """(sigmas [n + 1], timesteps [n]) as diffusers' LensPipeline sets them: the
        scheduler's ``set_timesteps(sigmas=linspace(1, 1/n, n), mu=empirical mu)``, so the
        scheduler's config (shift, dynamic shifting, time-shift type, ...) is honoured.
        ``mu`` (lens_fast's) replaces the empirical shift."""
        if not isinstance(num_inference_steps, int) or isinstance(num_inference_steps, bool) or num_inference_steps < 1:
            raise InvalidValue(f"num_inference_steps={num_inference_steps!r}: expected a positive integer")
        mu = compute_empirical_mu(image_seq_len, num_inference_steps) if mu is None else float(mu)
        base = np.linspace(1.0, 1.0 / num_inference_steps, num_inference_steps)
        self.scheduler.set_timesteps(sigmas=base, device=device, mu=mu)
        return self.scheduler.sigmas, self.scheduler.timesteps

    def denoise(self, latents, feats, mask, grid: Tuple[int, int], num_inference_steps: int, guidance_scale: float,
                callback_on_step_end=None, callback_on_step_end_tensor_inputs=("latents",), extra=None,
                mu: Optional[float] = None):
        """The sampling loop on token latents [B, N, C]; ``feats``/``mask`` hold the
        cond rows and, when CFG runs, the uncond rows after them. Runs on the engine when
        the fast path is on (with the scheduler's sigmas); else each step is the
        scheduler's own ``step``."""
        if self.engine is not None and not _plain_euler(self.scheduler):
            raise InvalidValue(f"the fast path runs FlowMatchEulerDiscreteScheduler's deterministic Euler step; "
                               f"this {type(self.scheduler).__name__} (stochastic_sampling="
                               f"{getattr(self.scheduler.config, 'stochastic_sampling', None)}) runs on the reference "
                               "path: call pipe.disable_fast_path()")
        h, w = grid
        sigmas, timesteps = self.schedule(num_inference_steps, h * w, mu, latents.device)
        self._num_timesteps = len(timesteps)
        if self.engine is not None:
            return self.engine.denoise(latents, feats, mask, grid, num_inference_steps, guidance_scale,
                                       callback_on_step_end, callback_on_step_end_tensor_inputs, extra,
                                       schedule=(sigmas, timesteps))
        batch = latents.shape[0]
        use_cfg = guidance_scale != 1.0
        img_shapes = [(1, h, w)]
        with self.progress_bar(total=num_inference_steps) as bar:
            for i, t in enumerate(timesteps):
                x_in = latents.repeat(2, 1, 1) if use_cfg else latents
                timestep = t.expand(x_in.shape[0]).to(latents.dtype) / 1000
                out = self.transformer(hidden_states=x_in, encoder_hidden_states=feats,
                                       encoder_hidden_states_mask=mask, timestep=timestep, img_shapes=img_shapes,
                                       return_dict=False)[0]
                noise_pred = cfg_combine(out[:batch], out[batch:], guidance_scale) if use_cfg else out
                latents = self.scheduler.step(noise_pred, t, latents, return_dict=False)[0]
                if callback_on_step_end is not None:
                    available = {"latents": latents, "noise_pred": noise_pred, **(extra or {})}
                    cb_out = callback_on_step_end(self, i, t,
                                                  {k: available[k] for k in callback_on_step_end_tensor_inputs})
                    latents = (cb_out or {}).pop("latents", latents)
                bar.update()
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
        if self.transformer is None:
            raise InvalidValue("this pipeline has no transformer: it only encodes prompts (encode_prompt)")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type={output_type!r}; expected one of {OUTPUT_TYPES}")
        for k in callback_on_step_end_tensor_inputs:
            if k not in CALLBACK_TENSORS:
                raise ValueError(f"callback tensor {k!r} is not one of {CALLBACK_TENSORS}")
        height, width = self._resolve_size(height, width, base_resolution, aspect_ratio)
        steps, guidance = self.call_defaults
        num_inference_steps = steps if num_inference_steps is None else num_inference_steps
        guidance_scale = guidance if guidance_scale is None else float(guidance_scale)
        if not math.isfinite(guidance_scale):
            raise InvalidValue(f"guidance_scale={guidance_scale}: expected a finite number")
        device, dtype = self._execution_device, self.transformer.dtype
        self._guidance_scale = guidance_scale
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
        h, w = height // self.vae_scale_factor, width // self.vae_scale_factor
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
        self.maybe_free_model_hooks()
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

        return rewrite_for_encoder(self.reasoner, self.prompt_encoder, prompt, max_sequence_length)

    def postprocess(self, latents, height, width, output_type):
        if self.engine is not None:
            return self.engine.postprocess(latents, height, width, output_type)
        if output_type == "latent":
            return latents
        if self.latent_codec is None:
            raise InvalidValue(f"output_type={output_type!r} needs a VAE and this pipeline has none; use "
                               "output_type='latent'")
        return decoded_to_output(self.latent_codec.decode(latents, height, width), output_type)

    @property
    def guidance_scale(self) -> float:
        return self._guidance_scale

    @property
    def num_timesteps(self) -> int:
        return self._num_timesteps
