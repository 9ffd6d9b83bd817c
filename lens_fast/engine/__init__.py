"""lens_fast.engine: Lens inference near the GPU's arithmetic floor.

``enable_fast_path(pipe, ...)`` switches a ``LensPipeline`` to the engine (same
``__call__`` arguments, results equal to the reference path within bf16 noise, fp32 to
~1e-6): fused ops and joint attention (whatever ``lens_fast.ops`` dispatch picks),
compiled blocks with static shapes, text length bucketed to multiples of 64 (the padding
hidden from attention by per-row key limits, not masks, so results do not change),
per-step constants precomputed for the schedule, a CUDA graph
per (resolution, batch, text bucket) replayed for every step, CFG and Euler on the
device, a prompt-embedding cache, and a tiled, compiled, channels_last VAE decode.
``enable_text_encoder_offload(pipe, mode)`` keeps the text encoder off the GPU between
encodings ('model': moved in whole; 'sequential': one layer at a time).
``disable_fast_path`` / ``disable_text_encoder_offload`` undo them.

The pipeline holds what these switch on as two attributes it calls explicitly:
``pipe.engine`` (a ``LensEngine``: ``LensPipeline.denoise`` and ``postprocess`` hand over
to it) and ``pipe.text_encoding`` (a ``TextEncoding``: the prompt cache and the offload
in front of the text encoder, used by ``LensPipeline._encode``); None means the
reference path. Nothing else of the pipeline changes: argument checking, prompt
alignment, noise and output conversion stay the reference's. The engine runs the model's
own code (``denoiser``): there is no second copy of the block.

Memory: a 1440^2 image with CFG in 24 GB (offload on, bf16)
------------------------------------------------------------
``memory.estimate_peak_memory`` writes the arithmetic out (tests check it); at 1440^2,
CFG (batch 2), text bucket 512, 20 steps, sequential text-encoder offload, tiled decode:
- denoiser weights: 4.104e9 params x 2 B = 8.21 GB, resident throughout;
- text encoder (GPT-OSS-20B, bf16, ~20.3e9 params used = 40.6 GB) is never resident:
  while encoding, embeddings 0.58e9 x 2 B = 1.16 GB plus one streamed decoder layer
  ~0.82e9 x 2 B = 1.64 GB are on the GPU (2.80 GB). Whole-model offload (mode 'model')
  would need the full 40.6 GB while encoding and does not fit 24 GB;
- denoiser activations: L = 8100 image + 512 text tokens, B = 2: one [B, L, 1536] bf16
  tensor is 52.9 MB; a block's peak holds ~20 of them (residual streams, normed input,
  QKV, q/k/v after norm + RoPE, attention output, MLP w1/w3/product at 4096 wide,
  float32 norm statistics): 1.06 GB. Attention is flash-style (no L x L matrix). The
  CUDA graph pool keeps these allocated after the loop, so they count during decode too;
- per-step tables 20 x 48 x 12 x 1536 x 2 B = 35 MB; text features 4 x 2 x 512 x 2880 x
  2 B = 24 MB; VAE weights 84e6 x 2 B = 0.17 GB;
- tiled VAE decode (1024 px tiles): ~3 live [1, 256, 1024, 1024] bf16 maps at the last
  up-block = 1.61 GB (untiled 1440^2: 3.19 GB) plus the float32 blend canvas 0.05 GB.
Phase peaks: encode 8.21 + 0.23 + 2.80 = 11.2 GB; denoise 9.5 GB; decode 11.2 GB. With
CUDA/cuBLAS workspaces and allocator fragmentation (~1-2 GB) the peak is ~13 GB, inside
24 GB with room to spare; 2080 x 1040 is within 0.1 GB of 1440^2.
"""
from __future__ import annotations

from typing import Iterable, Optional, Sequence, Tuple, Union

from ..resolutions import official_resolutions
from .engine import LensEngine, StepBuffers
from .memory import estimate_peak_memory
from .schedule import StepTables, bucket_length, bucket_text, build_step_tables
from .text import OFFLOAD_MODES, PromptCache, TextEncoderOffload, TextEncoding
from .vae_decode import FastDecoder, tile_starts

__all__ = ["OFFLOAD_MODES", "enable_fast_path", "disable_fast_path", "enable_text_encoder_offload",
           "disable_text_encoder_offload", "get_engine", "official_resolutions", "LensEngine", "StepBuffers",
           "StepTables", "FastDecoder", "PromptCache", "TextEncoderOffload", "TextEncoding", "bucket_length",
           "bucket_text", "build_step_tables", "tile_starts", "estimate_peak_memory"]


def get_engine(pipe) -> Optional[LensEngine]:
    """The engine enabled on ``pipe``, or None."""
    return pipe.engine


def enable_fast_path(pipe, *, compile: Optional[bool] = None, cuda_graphs: Optional[bool] = None,
                     text_bucket: Optional[int] = 64,
                     prewarm: Union[None, str, int, Iterable[Tuple[int, int]]] = None,
                     prewarm_text_lengths: Sequence[int] = (256,), keep_fp32_latents: bool = False,
                     text_cache_size: int = 32, **engine_options) -> LensEngine:
    """Switch ``pipe`` to the engine and return it.

    ``compile`` / ``cuda_graphs``: default on for a CUDA pipeline, off on the CPU
    (CUDA graphs need CUDA). ``text_bucket``: text lengths are padded to a multiple of it
    (None: no bucketing). ``prewarm``: 'official', 1024, 1440 or a list of (height,
    width) to compile/capture up front, at each of ``prewarm_text_lengths`` and the
    pipeline's recommended guidance. ``text_cache_size``: prompt-embedding cache entries
    (0 disables; unused when the text encoder has its own cache turned on). Further
    options go to ``LensEngine`` (compile_mode, vae_tile, vae_overlap,
    vae_max_untiled_area, compile_vae, channels_last, max_cached_shapes).
    """
    resolutions = None
    if prewarm is not None:
        resolutions = official_resolutions(prewarm) if isinstance(prewarm, (str, int)) else list(prewarm)
    disable_fast_path(pipe)
    engine = LensEngine(pipe, compile=compile, cuda_graphs=cuda_graphs, text_bucket=text_bucket,
                        keep_fp32_latents=keep_fp32_latents, **engine_options)
    pipe.engine = engine
    if pipe.prompt_encoder is not None:
        # An encoder that caches by itself (LensTextEncoder(cache_size > 0)) keeps doing so;
        # the engine's exact whole-call cache (see engine.text) serves the others.
        own = getattr(pipe.prompt_encoder, "cache_size", 0)
        _text_encoding(pipe).cache = PromptCache(0 if own else text_cache_size)
    if resolutions is not None:
        engine.prewarm(resolutions, prewarm_text_lengths)
    return engine


def disable_fast_path(pipe) -> None:
    """Return ``pipe`` to the reference path (text-encoder offload, if on, stays on)."""
    engine, pipe.engine = pipe.engine, None
    if engine is not None:
        engine.decoder.release()
    text = pipe.text_encoding
    if text is not None:
        text.cache = PromptCache(0)
        if text.offload is None:
            pipe.text_encoding = None


def enable_text_encoder_offload(pipe, mode: str = "model") -> TextEncoderOffload:
    """Keep the text encoder on the CPU; bring it to the pipeline's device for each
    encoding (``mode='model'``: whole, ``'sequential'``: one decoder layer at a time)."""
    if pipe.prompt_encoder is None:
        raise ValueError("this pipeline has no text encoder to offload (model_index.json lists none)")
    offload = TextEncoderOffload(pipe.prompt_encoder, mode)
    _text_encoding(pipe).offload = offload
    return offload


def disable_text_encoder_offload(pipe) -> None:
    """Stop offloading: the text encoder goes back to the pipeline's device."""
    text = pipe.text_encoding
    if text is None or text.offload is None:
        return
    text.offload = None
    if pipe.prompt_encoder is not None:
        pipe.prompt_encoder.to(pipe.device)
    if text.cache.size == 0:
        pipe.text_encoding = None


def _text_encoding(pipe) -> TextEncoding:
    if pipe.text_encoding is None:
        pipe.text_encoding = TextEncoding(cache_size=0)
    return pipe.text_encoding
