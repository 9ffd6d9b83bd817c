"""LensEngine: the fast path a ``LensPipeline`` holds (``pipe.engine``) and calls for its
denoise loop and decode (same arguments, same numbers within bf16 noise).

Per call, before the loop: the text stream is embedded once (the model's ``embed_text``)
and padded to a multiple of ``text_bucket`` (masks per ``schedule.bucket_text``, turned
into per-row key limits by ``schedule.key_limits``: no dense mask reaches attention where
the masks are prefixes, the usual case), the
RoPE table and the schedule's tables (the model's ``modulations`` for every step, dt)
are built or fetched from a cache. Each step then is one ``_step`` on static buffers:
denoiser forward over [cond ; uncond], CFG combine and Euler update on the device,
written back into the latents buffer. On CUDA the step is captured once per
(resolution, batch, text bucket, latent dtype) as a CUDA graph and replayed n times; the
host loop only copies step i's constants into the buffers (no synchronisation).
guidance == 1 runs batch 1.

Latents stay in the model dtype between steps like the reference
(``keep_fp32_latents=True`` keeps them in float32 instead).
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Iterable, List, Optional, Sequence, Tuple

import torch
from tqdm.auto import tqdm

from ..images import decoded_to_output
from ..sampling import cfg_combine
from .denoiser import FastDenoiser, default_compile_mode
from .graphs import GraphPool
from .schedule import StepTables, bucket_text, build_step_tables, key_limits
from .vae_decode import FastDecoder


@dataclass
class StepBuffers:
    """Static tensors one denoise step reads (all but latents/noise_pred) and writes."""

    latents: torch.Tensor      # [B, N, C]   model dtype (or float32)
    noise_pred: torch.Tensor   # [B, N, C]   model dtype
    txt: torch.Tensor          # [Bt, S_b, dim]
    text_mask: torch.Tensor    # [Bt, S_b] bool: reference mask AND bucket-valid
    ref_len: Optional[torch.Tensor]  # [Bt] int32: its per-row length (None: a row has holes)
    open_len: torch.Tensor     # [Bt] int32: the bucket-valid length (blocks without a reference mask)
    rope: torch.Tensor         # [N + S_b, D/2, 2] float32
    mods: torch.Tensor         # [L, 12, Bt, dim]
    out_mods: torch.Tensor     # [2, Bt, dim]
    dt: torch.Tensor           # 0-dim float32
    guidance: torch.Tensor     # 0-dim float32
    cfg: bool


class _Runner:
    """The buffers (and on CUDA the captured graph) of one shape key."""

    def __init__(self, buffers: StepBuffers):
        self.buffers = buffers
        self.graph = None


class LensEngine:
    """Owns the fast-path state of one pipeline. Build with ``enable_fast_path``."""

    def __init__(self, pipe, compile: Optional[bool] = None, cuda_graphs: Optional[bool] = None,
                 text_bucket: Optional[int] = 64, keep_fp32_latents: bool = False,
                 compile_mode: Optional[str] = None, vae_tile: int = 128, vae_overlap: int = 32,
                 vae_max_untiled_area: Optional[int] = 160 * 160, compile_vae: Optional[bool] = None,
                 channels_last: Optional[bool] = None, max_cached_shapes: int = 8):
        device = pipe.device
        cuda = device.type == "cuda"
        self.compile = cuda if compile is None else bool(compile)
        self.cuda_graphs = cuda if cuda_graphs is None else bool(cuda_graphs)
        if self.cuda_graphs and not cuda:
            raise ValueError(f"cuda_graphs=True needs the pipeline on a CUDA device; it is on {device}")
        if text_bucket is not None and (not isinstance(text_bucket, int) or text_bucket < 1):
            raise ValueError(f"text_bucket={text_bucket!r}: expected a positive integer or None")
        if max_cached_shapes < 1:
            raise ValueError(f"max_cached_shapes={max_cached_shapes}: expected >= 1")
        self.pipe = pipe
        self.text_bucket = text_bucket
        self.keep_fp32_latents = bool(keep_fp32_latents)
        self.denoiser = FastDenoiser(pipe.transformer, self.compile,
                                     compile_mode if compile_mode is not None else default_compile_mode(device))
        self.decoder = FastDecoder(pipe.latent_codec, vae_tile, vae_overlap, vae_max_untiled_area,
                                   compile=cuda if compile_vae is None else compile_vae,
                                   channels_last=cuda if channels_last is None else channels_last)
        self.max_cached_shapes = max_cached_shapes
        self._tables: "OrderedDict[tuple, StepTables]" = OrderedDict()
        self._runners: "OrderedDict[tuple, _Runner]" = OrderedDict()
        self.graph_captures = 0
        self._graph_pool = GraphPool()

    # -- caches ---------------------------------------------------------------------------
    def tables(self, num_steps: int, image_seq_len: int, mu=None, schedule=None) -> StepTables:
        """Step tables, cached by shape and schedule; ``schedule`` = (sigmas, timesteps)
        from the pipeline's scheduler (else Lens's schedule with ``mu``)."""
        model = self.pipe.transformer
        sched_key = None if schedule is None else tuple(torch.cat([schedule[0].flatten(),
                                                                   schedule[1].flatten()]).tolist())
        key = (num_steps, image_seq_len, mu, sched_key, model.dtype, model.device)
        if key not in self._tables:
            self._tables[key] = build_step_tables(model, num_steps, image_seq_len, mu=mu, schedule=schedule)
            while len(self._tables) > 16:
                self._tables.popitem(last=False)
        self._tables.move_to_end(key)
        return self._tables[key]

    def clear(self) -> None:
        """Drop cached tables, buffers and graphs (needed after replacing weight tensors or
        modules; in-place weight updates need only ``clear_tables``)."""
        self._tables.clear()
        self._runners.clear()
        self._graph_pool = GraphPool()

    def clear_tables(self) -> None:
        """Drop the per-schedule tables (the modulations, computed from the weights of the
        modulation linears): needed after those weights changed in place."""
        self._tables.clear()

    def _runner(self, grid, batch: int, cfg: bool, txt_len: int, latent_dtype, prefix: bool) -> _Runner:
        """``prefix``: the reference mask is a per-row prefix (passed as lengths, no mask)."""
        model = self.pipe.transformer
        h, w = grid
        bt = 2 * batch if cfg else batch
        key = (h, w, batch, cfg, txt_len, latent_dtype, prefix, model.dtype, model.device)
        if key in self._runners:
            self._runners.move_to_end(key)
            return self._runners[key]
        dev, dt, dim = model.device, model.dtype, model.inner_dim
        n, c_in = h * w, model.config.in_channels
        buffers = StepBuffers(
            latents=torch.zeros(batch, n, c_in, device=dev, dtype=latent_dtype),
            noise_pred=torch.zeros(batch, n, model.config.patch_size ** 2 * model.out_channels, device=dev, dtype=dt),
            txt=torch.zeros(bt, txt_len, dim, device=dev, dtype=dt),
            text_mask=torch.ones(bt, txt_len, device=dev, dtype=torch.bool),
            ref_len=torch.zeros(bt, device=dev, dtype=torch.int32) if prefix else None,
            open_len=torch.zeros(bt, device=dev, dtype=torch.int32),
            rope=model.rope_table(h, w, txt_len, dev).clone(),
            mods=torch.zeros(len(model.transformer_blocks), 12, bt, dim, device=dev, dtype=dt),
            out_mods=torch.zeros(2, bt, dim, device=dev, dtype=dt),
            dt=torch.zeros((), device=dev, dtype=torch.float32),
            guidance=torch.ones((), device=dev, dtype=torch.float32), cfg=cfg)
        runner = _Runner(buffers)
        self._runners[key] = runner
        while len(self._runners) > self.max_cached_shapes:
            self._runners.popitem(last=False)
        return runner

    # -- the step -------------------------------------------------------------------------
    def _step(self, buf: StepBuffers) -> None:
        """One sampling step on static buffers; no host synchronisation."""
        x = buf.latents.to(self.pipe.transformer.dtype)
        x_in = torch.cat([x, x], 0) if buf.cfg else x
        out = self.denoiser(x_in, buf.txt, buf.rope, buf.text_mask, buf.ref_len, buf.open_len, buf.mods,
                            buf.out_mods)
        v = cfg_combine(out[:x.shape[0]], out[x.shape[0]:], buf.guidance) if buf.cfg else out
        buf.noise_pred.copy_(v)
        # The reference's scheduler step: float32 sample + (0-dim float32 dt) * v, cast back.
        buf.latents.copy_(buf.latents.to(torch.float32) + buf.dt * v)

    @staticmethod
    def _load_step(buf: StepBuffers, tables: StepTables, i: int) -> None:
        buf.mods.copy_(tables.block_mods[i].unsqueeze(2))
        buf.out_mods.copy_(tables.out_mods[i].unsqueeze(1))
        buf.dt.copy_(tables.dt[i])

    # -- the loop (what LensPipeline.denoise runs when the engine is on) -------------------
    @torch.no_grad()
    def prepare(self, latents, feats, mask, grid: Tuple[int, int], num_inference_steps: int,
                guidance_scale: float, mu=None, schedule=None) -> Tuple[Callable[[], None], StepBuffers, StepTables]:
        """Everything before the loop: the checks, the step tables, the text stream and its
        key limits, the runner's buffers loaded with step 0's constants, on CUDA the graph.
        Returns ``(run, buffers, tables)``: ``run()`` is one step on the buffers (a graph
        replay when captured); ``denoise`` loads step i's constants before each."""
        model = self.pipe.transformer
        h, w = grid
        batch = latents.shape[0]
        cfg = guidance_scale != 1.0
        if mask is None or feats[0].shape[0] != (2 * batch if cfg else batch):
            raise ValueError(f"text features have batch {feats[0].shape[0]} and mask "
                             f"{None if mask is None else tuple(mask.shape)}; expected "
                             f"{2 * batch if cfg else batch} rows ({'[cond; uncond]' if cfg else 'cond'}) with a mask")
        if latents.shape[1] != h * w:
            raise ValueError(f"latents have {latents.shape[1]} tokens; expected h*w = {h}*{w} = {h * w}")
        tables = self.tables(num_inference_steps, h * w, mu, schedule)
        txt, text_mask, text_valid = bucket_text(model.embed_text(feats), mask.to(model.device), self.text_bucket)
        ref_len, open_len = key_limits(text_mask, text_valid)
        latent_dtype = torch.float32 if self.keep_fp32_latents else model.dtype
        runner = self._runner(grid, batch, cfg, txt.shape[1], latent_dtype, ref_len is not None)
        buf = runner.buffers
        buf.latents.copy_(latents)
        buf.txt.copy_(txt)
        buf.text_mask.copy_(text_mask)
        if ref_len is not None:
            buf.ref_len.copy_(ref_len)
        buf.open_len.copy_(open_len)
        buf.guidance.fill_(float(guidance_scale))
        self._load_step(buf, tables, 0)
        if self.cuda_graphs and runner.graph is None:
            runner.graph = self._graph_pool.capture(lambda: self._step(buf), [buf.latents, buf.noise_pred])
            self.graph_captures += 1
        run = runner.graph.replay if runner.graph is not None else (lambda: self._step(buf))
        return run, buf, tables

    @torch.no_grad()
    def denoise(self, latents, feats, mask, grid: Tuple[int, int], num_inference_steps: int,
                guidance_scale: float, callback_on_step_end=None,
                callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",), extra=None, mu=None,
                schedule=None):
        run, buf, tables = self.prepare(latents, feats, mask, grid, num_inference_steps, guidance_scale, mu, schedule)
        bar = tqdm(total=num_inference_steps, **self.pipe._progress)
        for i in range(num_inference_steps):
            if i:
                self._load_step(buf, tables, i)
            run()
            if callback_on_step_end is not None:
                self._callback(callback_on_step_end, callback_on_step_end_tensor_inputs, buf, tables, i, extra)
            bar.update()
        bar.close()
        return buf.latents.to(self.pipe.transformer.dtype, copy=True)

    def _callback(self, fn, names, buf: StepBuffers, tables: StepTables, i: int, extra) -> None:
        available = {"latents": buf.latents.to(self.pipe.transformer.dtype, copy=True),
                     "noise_pred": buf.noise_pred.clone(), **(extra or {})}
        out = fn(self.pipe, i, tables.timesteps[i], {k: available[k] for k in names})
        new = (out or {}).pop("latents", None)
        if new is not None:
            buf.latents.copy_(new)

    # -- decode (what LensPipeline.postprocess runs when the engine is on) -----------------
    @torch.no_grad()
    def postprocess(self, latents, height: int, width: int, output_type: str):
        if output_type == "latent":
            return latents
        return decoded_to_output(self.decoder.decode(latents, height, width), output_type)

    # -- pre-warming ----------------------------------------------------------------------
    @torch.no_grad()
    def prewarm(self, resolutions: Iterable[Tuple[int, int]], text_lengths: Sequence[int] = (256,),
                guidance_scales: Optional[Sequence[float]] = None, decode: bool = False) -> List[tuple]:
        """Compile (and on CUDA capture) the step for each (height, width) x text length x
        guidance (CFG batch 2 when != 1, else batch 1) by running one step on zeros.
        ``decode`` also compiles the VAE decode at each resolution. Returns the keys warmed."""
        model, pipe = self.pipe.transformer, self.pipe
        guidance_scales = (pipe.recommended[1],) if guidance_scales is None else tuple(guidance_scales)
        text_lengths = tuple(int(s) for s in text_lengths)
        if not text_lengths or not guidance_scales or min(text_lengths) < 1:
            raise ValueError(f"prewarm needs text lengths >= 1 and guidance scales; got text_lengths={text_lengths}, "
                             f"guidance_scales={guidance_scales}")
        warmed = []
        for height, width in resolutions:
            grid = pipe.latent_codec.latent_grid(int(height), int(width))
            for s in text_lengths:
                for g in guidance_scales:
                    rows = 2 if g != 1.0 else 1
                    feats = [torch.zeros(rows, s, model.config.enc_hidden_dim, device=model.device,
                                         dtype=model.dtype) for _ in range(model.num_text_layers)]
                    mask = torch.ones(rows, s, dtype=torch.bool, device=model.device)
                    lat = torch.zeros(1, grid[0] * grid[1], model.config.in_channels, device=model.device,
                                      dtype=model.dtype)
                    out = self.denoise(lat, feats, mask, grid, 1, float(g))
                    warmed.append((int(height), int(width), s, g))
            if decode:
                self.postprocess(out, int(height), int(width), "pt")
        return warmed
