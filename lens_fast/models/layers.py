"""The layers of the Lens block and model heads, with the official checkpoint's module names:
RMSNorm, the SwiGLU MLP (``GateMLP``, fusable into one w1|w3 GEMM) and the non-gated
``FeedForward``, the timestep embedding and the modulated output norm. The glue between
GEMMs goes through ``lens_fast.ops`` (fused kernels when the backend allows, the reference
math under ``LENS_FAST_BACKEND=torch``)."""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops.norm_modulate import layer_norm_modulate, rms_norm
from ..ops.swiglu import silu_mul, swiglu
from .embeddings import timestep_embedding


class RMSNorm(nn.Module):
    """RMSNorm with weight; statistics in float32 (diffusers semantics)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)


class GateMLP(nn.Module):
    """SwiGLU ``w2(silu(w1 x) * w3 x)``, no biases.

    ``fuse()`` (inference; see ``LensTransformer2DModel.fuse_projections``) replaces w1
    and w3 by one Linear ``w13`` holding [w1; w3], so both projections run as one GEMM
    followed by the fused ``swiglu`` kernel. ``state_dict()`` / ``load_state_dict()``
    keep speaking the official ``w1.weight`` / ``w3.weight`` keys either way (state-dict
    hooks), so checkpoints never see ``w13``. Training keeps w1 and w3 separate (FSDP2
    shards the plain modules; ``silu_mul`` fuses the activation there).
    """

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.hidden = hidden
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.register_state_dict_post_hook(_emit_w1_w3)
        self.register_load_state_dict_pre_hook(_read_w1_w3)

    @property
    def fused(self) -> bool:
        return "w13" in self._modules

    def fuse(self) -> "GateMLP":
        """One [2*hidden, dim] weight for w1 and w3. Idempotent."""
        if self.fused:
            return self
        w1, w3 = self.w1.weight, self.w3.weight
        w13 = nn.Linear(w1.shape[1], 2 * self.hidden, bias=False, device="meta")
        w13.weight = nn.Parameter(torch.cat([w1.detach(), w3.detach()], 0), requires_grad=w1.requires_grad)
        del self.w1, self.w3
        self.w13 = w13
        return self

    def forward(self, x):
        if self.fused:
            return self.w2(swiglu(self.w13(x)))
        return self.w2(silu_mul(self.w1(x), self.w3(x)))


def _emit_w1_w3(module: GateMLP, state_dict, prefix, local_metadata) -> None:
    """state_dict of a fused GateMLP: the official w1/w3 keys, as views of w13 (disjoint
    row ranges of one storage, which safetensors saves without copies)."""
    if module.fused:
        w13 = state_dict.pop(prefix + "w13.weight").detach()
        state_dict[prefix + "w1.weight"] = w13[:module.hidden]
        state_dict[prefix + "w3.weight"] = w13[module.hidden:]


def _read_w1_w3(module: GateMLP, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                error_msgs) -> None:
    """load_state_dict into a fused GateMLP from the official w1/w3 keys."""
    k1, k3 = prefix + "w1.weight", prefix + "w3.weight"
    if module.fused and k1 in state_dict and k3 in state_dict:
        state_dict[prefix + "w13.weight"] = torch.cat([state_dict.pop(k1), state_dict.pop(k3)], 0)


class GeluProj(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.proj = nn.Linear(dim, hidden)

    def forward(self, x):
        return F.gelu(self.proj(x), approximate="tanh")


class FeedForward(nn.Module):
    """The non-gated MLP variant (``gate_mlp=False``): diffusers' gelu-approximate
    FeedForward with its key names ``net.0.proj`` / ``net.2``."""

    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.ModuleList([GeluProj(dim, 4 * dim), nn.Dropout(0.0), nn.Linear(4 * dim, dim)])

    def forward(self, x):
        for m in self.net:
            x = m(x)
        return x


class TimestepEmbedding(nn.Module):
    def __init__(self, in_channels: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_channels, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x):
        return self.linear_2(F.silu(self.linear_1(x)))


class LensTimestepProjEmbeddings(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.timestep_embedder = TimestepEmbedding(256, dim)

    def forward(self, sigma: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.timestep_embedder(timestep_embedding(sigma, 256).to(dtype))


class AdaLayerNormContinuous(nn.Module):
    """Output head: LayerNorm (no affine) modulated by ``Linear(SiLU(temb))`` -> (scale, shift)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.linear = nn.Linear(dim, 2 * dim)

    def modulation(self, temb, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
        """(scale, shift) [B, dim] for the timestep embedding ``temb``, in ``dtype``."""
        return tuple(self.linear(F.silu(temb).to(dtype)).chunk(2, dim=1))

    def modulate(self, x, modulation: Tuple[torch.Tensor, torch.Tensor]):
        scale, shift = modulation
        return layer_norm_modulate(x, shift, scale, self.eps)

    def forward(self, x, temb):
        return self.modulate(x, self.modulation(temb, x.dtype))
