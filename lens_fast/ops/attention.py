"""Joint attention over Lens's [image ; text] sequence: one entry point, four exact backends.

``joint_attention(q, k, v, txt_mask, n_img=..., txt_len=None, backend=None)``: q, k, v
[B, L, H, D] (strided views allowed), L = n_img image tokens then S text tokens; the text
keys a row attends to are given by ``txt_mask`` [B, S] (True = real token, any pattern), or
by ``txt_len`` [B] integers (row b attends to the first txt_len[b] text keys: a per-row
key limit, no mask), or neither (all keys). Scale 1/sqrt(D), not causal, image keys always
valid. Returns [B, L, H, D] contiguous in q's dtype; differentiable in q, k, v on every
backend; the Triton path is a ``torch.library.custom_op`` (fake + autograd registered), so
``torch.compile(fullgraph=True)`` traces through it.

Backends and how each keeps text padding free and NaN-free:
- ``flash_attn``: FlashAttention-3/2 when installed. No mask: the dense call. With a
  mask or key limits: the valid key rows of every sample are gathered (``pack_valid_keys``)
  and one varlen call runs with cu_seqlens (queries unpacked, all L per sample), so padded
  keys cost nothing and no dense mask exists.
- ``triton``: our kernel (``lens_fast.kernels.flash_attention``): per-sample key bound
  ``n_img + last valid text index + 1`` computed on the device, key blocks past it are
  never visited, holes inside the text are masked from the [B, S] mask bytes; with
  ``txt_len`` the bound is ``n_img + txt_len`` and no mask byte is read.
- ``sdpa``: ``F.scaled_dot_product_attention`` WITHOUT any mask: samples are grouped into
  runs of consecutive rows sharing one valid-key set, and each run attends to exactly its
  valid keys (a slice for right padding and for ``txt_len``, a gather otherwise); an empty
  negative prompt attends to the image keys alone. This keeps SDPA on its flash kernel and away from the
  masked paths with known NaN cases (cuDNN with a mask at L = 64 mod 128; masked
  efficient-attention rows whose keys are mostly masked), at the price of one host sync
  per new mask or lengths tensor (cached per object and version, so a 48-block forward
  syncs once).
  Under ``torch.compile`` and while a CUDA graph is being captured the sync is impossible:
  there a [B, 1, 1, L] boolean key mask is broadcast (never [L, L]) with cuDNN excluded
  (same result). A masked ``flash_attn`` call (its packing syncs too) takes that path
  during a capture as well.
- ``torch``: the math reference ``joint_attention_ref`` (fp32 softmax, -inf on padding).

Selection: argument ``backend`` > ``LENS_FAST_ATTENTION`` (flash_attn|sdpa|triton|torch,
this op only; a named backend that cannot run is an error) > ``LENS_FAST_BACKEND`` (family,
see ``dispatch``) > auto. Auto, by measured speed (bench/attention.py, H200, torch 2.11,
bench/results/): CUDA fp16/bf16: flash_attn if installed; else sdpa, which on that card
beat the Triton kernel at every Lens shape (B2 H24 D64, 4096+256 tokens: fwd 0.50 vs
0.70 ms, bwd 1.33 vs 2.24 ms; with CFG padding 0.54 vs 0.71 / 1.72 vs 2.68 ms), except
inside torch.compile with a mask or key limits, where sdpa would fall back to a broadcast
mask and triton is taken (with key limits: not yet measured on a GPU). fp32 or head dims
outside (16, 32, 64, 128): sdpa. CPU: sdpa (the Triton interpreter is a test vehicle, used
only when named).
"""
from __future__ import annotations

import math
import os
import weakref
from typing import Callable, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from . import dispatch, optional

__all__ = ["joint_attention", "joint_attention_ref", "select_backend", "pack_valid_keys",
           "key_valid_mask", "PackedKeys", "BACKENDS", "ATTENTION_ENV"]

OP = "joint_attention"
ATTENTION_ENV = "LENS_FAST_ATTENTION"
BACKENDS = ("flash_attn", "sdpa", "triton", "torch")
TRITON_HEAD_DIMS = (16, 32, 64, 128)
_MASKED_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def _kernels():
    """The Triton kernel module, imported on first use (so importing lens_fast never
    imports triton, and TRITON_INTERPRET set by a test still applies)."""
    from lens_fast.kernels import flash_attention
    return flash_attention


# ----------------------------------------------------------------------------- reference

def joint_attention_ref(q, k, v, txt_mask: Optional[torch.Tensor], n_img: int,
                        upcast: bool = True) -> torch.Tensor:
    """Math reference of the joint attention: [B, L, H, D] in and out; padded text keys
    (mask False) get -inf; image keys are always valid."""
    dtype = q.dtype
    if upcast:
        q, k, v = q.float(), k.float(), v.float()
    scores = torch.einsum("blhd,bmhd->bhlm", q, k) / math.sqrt(q.shape[-1])
    if txt_mask is not None:
        keep = torch.cat([torch.ones(txt_mask.shape[0], n_img, dtype=torch.bool, device=q.device),
                          txt_mask.bool()], 1)
        scores = scores.masked_fill(~keep[:, None, None, :], float("-inf"))
    probs = scores.softmax(-1)
    return torch.einsum("bhlm,bmhd->blhd", probs, v).to(dtype)


# ----------------------------------------------------------------------------- packing

def key_valid_mask(txt_mask: torch.Tensor, n_img: int) -> torch.Tensor:
    """[B, L] bool: image keys always valid, then the text mask."""
    ones = torch.ones(txt_mask.shape[0], n_img, dtype=torch.bool, device=txt_mask.device)
    return torch.cat([ones, txt_mask.bool()], 1)


class PackedKeys(NamedTuple):
    k: torch.Tensor            # [total_valid, H, D]
    v: torch.Tensor            # [total_valid, H, D]
    cu_seqlens: torch.Tensor   # int32 [B + 1]: sample b owns rows cu[b]:cu[b+1]
    max_seqlen: int
    index: torch.Tensor        # int64 [total_valid]: rows of k.flatten(0, 1) that were kept


def pack_valid_keys(k: torch.Tensor, v: torch.Tensor, txt_mask: torch.Tensor,
                    n_img: int) -> PackedKeys:
    """Gather every sample's valid key/value rows (image keys, then valid text keys in order)
    into varlen layout. Text padding may be any pattern. One host sync (the total length)."""
    B, L, H, D = k.shape
    valid = key_valid_mask(txt_mask, n_img)
    index = valid.reshape(-1).nonzero().squeeze(1)
    counts = valid.sum(1, dtype=torch.int32)
    cu = F.pad(counts.cumsum(0, dtype=torch.int32), (1, 0))
    kp = k.reshape(B * L, H, D).index_select(0, index)
    vp = v.reshape(B * L, H, D).index_select(0, index)
    return PackedKeys(kp, vp, cu, int(counts.max().item()), index)


# ----------------------------------------------------------------------------- backends

def prefix_mask(txt_len: torch.Tensor, s: int) -> torch.Tensor:
    """[B, S] bool: True at the first txt_len[b] text positions of row b."""
    return torch.arange(s, device=txt_len.device) < txt_len[:, None]


def _attn_torch(q, k, v, txt_mask, n_img, txt_len=None):
    if txt_len is not None:
        txt_mask = prefix_mask(txt_len, q.shape[1] - n_img)
    return joint_attention_ref(q, k, v, txt_mask, n_img, upcast=True).contiguous()


def _first(result):
    """FlashAttention-3 returns (out, lse) in some versions, FlashAttention-2 returns out."""
    return result[0] if isinstance(result, (tuple, list)) else result


def _attn_flash(q, k, v, txt_mask, n_img, txt_len=None, funcs: Optional[Tuple[Callable, Callable]] = None):
    """``funcs`` = (flash_attn_func, flash_attn_varlen_func); tests pass math versions."""
    dense, varlen = funcs if funcs is not None else optional.flash_attn_func()
    B, L, H, D = q.shape
    scale = D ** -0.5
    if txt_len is not None:
        txt_mask = prefix_mask(txt_len, L - n_img)
    if txt_mask is None:
        return _first(dense(q, k, v, softmax_scale=scale, causal=False)).contiguous()
    packed = pack_valid_keys(k, v, txt_mask, n_img)
    cu_q = torch.arange(0, (B + 1) * L, L, dtype=torch.int32, device=q.device)
    out = varlen(q.reshape(B * L, H, D), packed.k, packed.v, cu_q, packed.cu_seqlens, L,
                 packed.max_seqlen, softmax_scale=scale, causal=False)
    return _first(out).reshape(B, L, H, D)


Keys = Union[slice, torch.Tensor]


class _KeyRunCache:
    """One-entry cache of the SDPA key plan, keyed by the mask (or lengths) object and its
    version counter (bumped by every in-place write), so one reused by all blocks syncs once."""

    def __init__(self):
        self.ref, self.key, self.plan = None, None, None

    def get(self, mask: torch.Tensor, n_img: int):
        try:
            key = (mask._version, n_img, mask.device)
        except RuntimeError:  # inference tensors carry no version counter: do not cache
            return None, None
        hit = self.ref is not None and self.ref() is mask and self.key == key
        return (self.plan if hit else None), key

    def put(self, mask, key, plan):
        if key is not None:
            self.ref, self.key, self.plan = weakref.ref(mask), key, plan


_KEY_RUNS = _KeyRunCache()


def _key_runs(txt_mask: torch.Tensor, n_img: int) -> List[Tuple[int, int, Keys]]:
    """[(b0, b1, keys)]: consecutive samples b0..b1-1 share the valid-key set ``keys``
    (a slice when it is a prefix of the sequence, else an index tensor)."""
    cached, cache_key = _KEY_RUNS.get(txt_mask, n_img)
    if cached is not None:
        return cached
    rows = txt_mask.detach().to("cpu", torch.bool)
    runs: list = []  # [b0, b1, keys, valid text positions]
    for b in range(rows.shape[0]):
        pos = tuple(rows[b].nonzero().flatten().tolist())
        if runs and runs[-1][3] == pos:
            runs[-1][1] = b + 1
            continue
        if pos == tuple(range(len(pos))):
            keys: Keys = slice(0, n_img + len(pos))
        else:
            keys = torch.cat([torch.arange(n_img), n_img + torch.tensor(pos, dtype=torch.long)])
            keys = keys.to(txt_mask.device)
        runs.append([b, b + 1, keys, pos])
    plan = [(b0, b1, keys) for b0, b1, keys, _ in runs]
    _KEY_RUNS.put(txt_mask, cache_key, plan)
    return plan


_LENGTH_RUNS = _KeyRunCache()


def _length_runs(txt_len: torch.Tensor, n_img: int) -> List[Tuple[int, int, slice]]:
    """[(b0, b1, keys)]: consecutive samples b0..b1-1 attend to the same prefix of keys."""
    cached, cache_key = _LENGTH_RUNS.get(txt_len, n_img)
    if cached is not None:
        return cached
    runs: list = []
    for b, n in enumerate(txt_len.detach().to("cpu").tolist()):
        if runs and runs[-1][2].stop == n_img + n:
            runs[-1][1] = b + 1
        else:
            runs.append([b, b + 1, slice(0, n_img + n)])
    plan = [tuple(r) for r in runs]
    _LENGTH_RUNS.put(txt_len, cache_key, plan)
    return plan


def _capturing(t: torch.Tensor) -> bool:
    """Whether a CUDA graph is being captured on ``t``'s device (no host sync allowed)."""
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def _attn_sdpa(q, k, v, txt_mask, n_img, txt_len=None):
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, L, D] views, no copies
    if txt_mask is None and txt_len is None:
        return F.scaled_dot_product_attention(qt, kt, vt).transpose(1, 2).contiguous()
    if torch.compiler.is_compiling() or _capturing(q):
        if txt_len is not None:
            txt_mask = prefix_mask(txt_len, q.shape[1] - n_img)
        keep = key_valid_mask(txt_mask, n_img)[:, None, None, :]
        with sdpa_kernel(_MASKED_SDPA_BACKENDS):
            out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=keep)
        return out.transpose(1, 2).contiguous()
    outs = []
    runs = _key_runs(txt_mask, n_img) if txt_len is None else _length_runs(txt_len, n_img)
    for b0, b1, keys in runs:
        if isinstance(keys, slice):
            kb, vb = kt[b0:b1, :, keys], vt[b0:b1, :, keys]
        else:
            kb, vb = kt[b0:b1].index_select(2, keys), vt[b0:b1].index_select(2, keys)
        outs.append(F.scaled_dot_product_attention(qt[b0:b1], kb, vb).transpose(1, 2))
    return torch.cat(outs, 0).contiguous() if len(outs) > 1 else outs[0].contiguous()


@torch.library.custom_op("lens_fast::joint_attention_triton", mutates_args=())
def _triton_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, txt_mask: Optional[torch.Tensor], n_img: int,
                key_len: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    return _kernels().attention_forward(q, k, v, txt_mask, n_img=n_img, key_len=key_len)


@_triton_fwd.register_fake
def _triton_fwd_fake(q, k, v, txt_mask, n_img, key_len=None):
    B, L, H, D = q.shape
    return q.new_empty((B, L, H, D)), q.new_empty((B, H, L), dtype=torch.float32)


@torch.library.custom_op("lens_fast::joint_attention_triton_backward", mutates_args=())
def _triton_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                out: torch.Tensor, lse: torch.Tensor, txt_mask: Optional[torch.Tensor], n_img: int,
                key_len: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _kernels().attention_backward(do, q, k, v, out, lse, txt_mask, n_img=n_img, key_len=key_len)


@_triton_bwd.register_fake
def _triton_bwd_fake(do, q, k, v, out, lse, txt_mask, n_img, key_len=None):
    return tuple(q.new_empty(q.shape) for _ in range(3))


def _triton_setup_context(ctx, inputs, output):
    q, k, v, txt_mask, n_img, key_len = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, txt_mask, key_len)
    ctx.n_img = n_img
    ctx.mark_non_differentiable(lse)


def _triton_backward(ctx, dout, _dlse):
    q, k, v, out, lse, txt_mask, key_len = ctx.saved_tensors
    dq, dk, dv = _triton_bwd(dout, q, k, v, out, lse, txt_mask, ctx.n_img, key_len)
    return dq, dk, dv, None, None, None


_triton_fwd.register_autograd(_triton_backward, setup_context=_triton_setup_context)


def _attn_triton(q, k, v, txt_mask, n_img, txt_len=None):
    key_len = None if txt_len is None else (txt_len + n_img).to(torch.int32)
    return _triton_fwd(q, k, v, txt_mask, n_img, key_len)[0]


_IMPLS = {"flash_attn": _attn_flash, "sdpa": _attn_sdpa, "triton": _attn_triton, "torch": _attn_torch}


# ----------------------------------------------------------------------------- selection

def _flash_available() -> bool:
    return torch.cuda.is_available() and optional.flash_attn_func() is not None


def _flash_accepts(device_type, dtype, head_dim, **_info) -> bool:
    return device_type == "cuda" and dtype in (torch.float16, torch.bfloat16) and head_dim % 8 == 0 \
        and head_dim <= 256


def _triton_accepts(device_type, dtype, head_dim, masked=False, auto=False, compiling=False) -> bool:
    if not dispatch.triton_accepts(device_type):
        return False
    if dtype not in (torch.float16, torch.bfloat16, torch.float32) or head_dim not in TRITON_HEAD_DIMS:
        return False
    if not auto:
        return True
    # Auto never picks the CPU interpreter nor fp32 (SDPA's job). It leaves eager runs to
    # SDPA (faster on H200 in bench/attention.py, masked or not), but takes compiled masked
    # runs, where SDPA could only use a broadcast mask over the padding.
    if device_type != "cuda" or dtype == torch.float32:
        return False
    return compiling and masked


def _sdpa_accepts(device_type, dtype, **_info) -> bool:
    return dtype.is_floating_point


_AVAILABLE = {"flash_attn": _flash_available, "triton": optional.triton_usable,
              "sdpa": lambda: True, "torch": lambda: True}
_ACCEPTS = {"flash_attn": _flash_accepts, "triton": _triton_accepts, "sdpa": _sdpa_accepts,
            "torch": lambda *a, **k: True}
# Registration order is the auto preference order (see the module docstring). Every rule
# depends on (device type, dtype, head dim, mask or not, auto, compiling) alone: the
# decision is cached whole.
for _name in ("flash_attn", "triton", "sdpa", "torch"):
    dispatch.register(OP, _name, available=_AVAILABLE[_name], accepts=_ACCEPTS[_name])


def _why_unavailable(name: str) -> str:
    if name == "flash_attn":
        if not torch.cuda.is_available():
            return "no CUDA device"
        return "neither flash_attn_interface (FA3) nor flash_attn (FA2) is installed"
    return optional.why_unavailable("triton" if name == "triton" else "cuda")


def select_backend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   txt_mask: Optional[torch.Tensor] = None, backend: Optional[str] = None,
                   *, compiling: bool = False, txt_len: Optional[torch.Tensor] = None) -> str:
    """Name of the backend that ``joint_attention`` would run on these inputs (``compiling``:
    as seen from inside torch.compile)."""
    source, name = "backend", backend
    if name is None:
        source, name = ATTENTION_ENV, os.environ.get(ATTENTION_ENV, "")
    name = name.strip().lower()
    info = dict(head_dim=q.shape[-1], masked=txt_mask is not None or txt_len is not None, compiling=compiling)
    if name in ("", "auto"):
        return dispatch.select(OP, q, k, v, txt_mask, **info)
    if name not in BACKENDS:
        raise ValueError(f"{source}={name!r} is not an attention backend; expected one of "
                         f"{', '.join(BACKENDS)} or auto")
    if not _AVAILABLE[name]():
        raise dispatch.BackendUnavailableError(
            f"{source}={name} but that backend is unavailable here ({_why_unavailable(name)})")
    if not _ACCEPTS[name](q.device.type, q.dtype, auto=False, **info):
        raise dispatch.BackendUnavailableError(
            f"{source}={name} does not support {q.device.type} {q.dtype} inputs with head_dim "
            f"{q.shape[-1]}" + (f" (triton head dims: {TRITON_HEAD_DIMS}; CPU needs "
                                f"TRITON_INTERPRET=1)" if name == "triton" else ""))
    return name


@torch.compiler.assume_constant_result
def _select_for_compile(device_type: str, device_index: Optional[int], dtype: torch.dtype,
                        head_dim: int, has_mask: bool, backend: Optional[str]) -> str:
    """``select_backend`` run outside the traced graph (it probes imports and logs): under
    torch.compile the choice is made once at trace time from probe tensors of the same
    device, dtype and head_dim, and baked into the graph as a constant."""
    device = torch.device(device_type) if device_index is None else torch.device(device_type, device_index)
    probe = torch.empty((1, 1, 1, head_dim), dtype=dtype, device=device)
    mask = torch.ones((1, 1), dtype=torch.bool, device=device) if has_mask else None
    return select_backend(probe, probe, probe, mask, backend, compiling=True)


def _concrete_head_dim(d) -> int:
    """``d`` as a plain int for the trace-time selection. Under torch.compile(dynamic=True)
    it is symbolic (and passes isinstance(d, int)), so match it against the multiples of 8 up
    to 256 (each comparison is a guard); any other value maps to 12, which like it is
    supported by neither flash-attn nor Triton."""
    for x in range(8, 257, 8):
        if d == x:
            return x
    return 12


def _validate(q, k, v, txt_mask, n_img, txt_len=None) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(txt_mask as bool, txt_len) after the checks; both None where nothing is excluded."""
    if q.dim() != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v must all be [B, L, H, D]; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or not q.is_floating_point():
        raise ValueError(f"q, k, v must share one floating dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device; got {q.device}, {k.device}, {v.device}")
    B, L = q.shape[:2]
    if not isinstance(n_img, (int, torch.SymInt)) or not 0 <= n_img <= L:
        raise ValueError(f"n_img={n_img!r} must be an int in [0, L={L}]")
    if txt_len is not None:
        if txt_mask is not None:
            raise ValueError("txt_mask and txt_len both given; expected one way to name the text keys")
        if tuple(txt_len.shape) != (B,) or txt_len.is_floating_point() or txt_len.dtype == torch.bool:
            raise ValueError(f"txt_len must be [B={B}] integers (valid leading text keys per row); got "
                             f"{txt_len.dtype} {tuple(txt_len.shape)}")
        if txt_len.device != q.device:
            raise ValueError(f"txt_len is on {txt_len.device}; expected {q.device} like q")
        if n_img == 0 and L > 0:
            raise ValueError("n_img=0 with txt_len: a row with no text keys would have no keys; "
                             "expected n_img >= 1 or txt_len=None")
        return None, (txt_len if L - n_img else None)
    if txt_mask is None:
        return None, None
    if tuple(txt_mask.shape) != (B, L - n_img):
        raise ValueError(f"txt_mask has shape {tuple(txt_mask.shape)}; expected [B, S] = "
                         f"[{B}, {L - n_img}] (S = L - n_img)")
    if txt_mask.device != q.device:
        raise ValueError(f"txt_mask is on {txt_mask.device}; expected {q.device} like q")
    if txt_mask.is_floating_point() or txt_mask.is_complex():
        raise ValueError(f"txt_mask must be bool (True = real token) or integer; got {txt_mask.dtype}")
    if L - n_img == 0:
        return None, None
    if n_img == 0:
        raise ValueError("n_img=0 with a txt_mask: a fully masked text row would have no keys; "
                         "expected n_img >= 1 or txt_mask=None")
    return (txt_mask if txt_mask.dtype == torch.bool else txt_mask != 0), None


def joint_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    txt_mask: Optional[torch.Tensor] = None, *, n_img: int,
                    txt_len: Optional[torch.Tensor] = None, backend: Optional[str] = None) -> torch.Tensor:
    """Attention over [image ; text] tokens with padded text keys excluded (see module doc).
    q, k, v [B, L, H, D]; txt_mask [B, L - n_img] bool, or txt_len [B] integers (each row's
    valid text keys are its first txt_len[b], in [0, L - n_img]), or neither; returns
    [B, L, H, D]."""
    txt_mask, txt_len = _validate(q, k, v, txt_mask, n_img, txt_len)
    restricted = txt_mask is not None or txt_len is not None
    if torch.compiler.is_compiling():
        name = _select_for_compile(q.device.type, q.device.index, q.dtype,
                                   _concrete_head_dim(q.shape[-1]), restricted, backend)
    else:
        name = select_backend(q, k, v, txt_mask, backend, txt_len=txt_len)
        if name == "flash_attn" and restricted and _capturing(q):
            name = "sdpa"
    return _IMPLS[name](q, k, v, txt_mask, n_img, txt_len)


def backend_names() -> Sequence[str]:
    """Registered backends in auto-preference order."""
    return dispatch.backends(OP)
