"""Process group, model construction and parallelism: deterministic per-parameter
initialisation (the same weights for any world size), activation checkpointing of
every k-th block, torch.compile of the blocks, FSDP2 (per block, then the root) with
bf16 compute / fp32 reduction over fp32 master weights, and the sharded EMA.

Large models are built on the meta device, sharded, then materialised one parameter
at a time (from the init rule or a safetensors checkpoint), so no rank ever holds the
whole model unsharded.
"""
from __future__ import annotations

import contextlib
import os
import warnings
import zlib
from dataclasses import dataclass
from typing import Callable, Dict, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
from safetensors import safe_open
from torch.utils.checkpoint import checkpoint

from lens_fast.errors import InvalidValue
from lens_fast.models.loading import find_weight_files, resolve_dtype
from lens_fast.models.transformer import LensTransformer2DModel

try:
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # pragma: no cover - torch without DTensor
    DTensor, distribute_tensor = (), None


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False  # this process initialised the group and must destroy it

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: Optional[str] = None, need_group: bool = False) -> DistInfo:
    """Join the torchrun group (NCCL on CUDA, gloo on CPU); a single process gets a
    one-rank group only when ``need_group`` (FSDP on one GPU)."""
    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device is None:
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    owns = False
    if not dist.is_initialized():
        if launched:
            dist.init_process_group(backend, device_id=dev if dev.type == "cuda" else None)
            owns = True
        elif need_group:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
            owns = True
    if dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, dev, owns)
    return DistInfo(device=dev)


def barrier(info: DistInfo) -> None:
    if dist.is_initialized() and info.world > 1:
        dist.barrier()


def all_ranks_ok(ok: bool, world: int) -> bool:
    """Whether every rank reports ``ok`` (collective; without a process group, this rank
    alone). Used where one rank may fail, so that no rank is left waiting."""
    if world > 1 and dist.is_initialized():
        flag = torch.tensor([1 if ok else 0], dtype=torch.int32)
        if dist.get_backend() == "nccl":
            flag = flag.cuda()
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())
    return ok


# -- initialisation -------------------------------------------------------------------
def init_rule(name: str, shape, seed: int) -> torch.Tensor:
    """The initial value of one parameter, fixed by (seed, name): adaLN-Zero as DiT
    (modulation, output-head modulation and proj_out start at zero, so every block
    starts as the identity), norms at one, biases at zero, other linear weights Xavier
    uniform, the timestep MLP N(0, 0.02)."""
    g = torch.Generator().manual_seed((int(seed) * 1_000_003 + zlib.crc32(name.encode())) % (2 ** 63))
    if name.endswith("bias") or "_mod." in name or name.startswith(("norm_out.linear", "proj_out")):
        return torch.zeros(shape)
    if len(shape) == 1:
        return torch.ones(shape)
    if "timestep_embedder" in name:
        return torch.randn(shape, generator=g) * 0.02
    bound = (6.0 / (shape[0] + shape[1])) ** 0.5
    return (torch.rand(shape, generator=g) * 2 - 1) * bound


def materialize(model: nn.Module, full_value: Callable[[str, tuple], torch.Tensor], device) -> None:
    """Allocate a meta (possibly FSDP-sharded) model on ``device`` and fill every
    parameter from ``full_value(name, shape)`` (a full CPU tensor), one at a time."""
    model.to_empty(device=device)
    with torch.no_grad():
        for name, p in model.named_parameters():
            full = full_value(name, tuple(p.shape)).to(device=device, dtype=p.dtype)
            if isinstance(p, DTensor):
                full = distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None)
            p.copy_(full)


def pretrained_values(folder: str):
    """``full_value`` reading a diffusers transformer folder's safetensors, one tensor at
    a time (memory-mapped; files stay open for the duration of the load)."""
    files, _ = find_weight_files(folder, LensTransformer2DModel.weights_name)
    handles = {path: safe_open(path, framework="pt", device="cpu") for path in files}
    where = {key: h for h in handles.values() for key in h.keys()}

    def value(name, shape):
        if name not in where:
            raise InvalidValue(f"{folder} has no weight {name}; it does not match the configured model")
        found = tuple(where[name].get_slice(name).get_shape())
        if found != tuple(shape):
            raise InvalidValue(f"{folder}: {name} has shape {found}, the model expects {tuple(shape)}")
        return where[name].get_tensor(name).float()
    return value


# -- activation checkpointing, compile, FSDP ---------------------------------------------
def apply_activation_checkpointing(model: LensTransformer2DModel, mode: str, every: int) -> int:
    """Recompute the chosen blocks in backward (``full``: all, ``selective``: every
    ``every``-th). Wraps the block's forward in place, keeping parameter names."""
    if mode == "none":
        return 0
    count = 0
    for i, block in enumerate(model.transformer_blocks):
        if mode == "full" or i % every == 0:
            inner = block.forward

            def forward(*args, _inner=inner):
                return checkpoint(_inner, *args, use_reentrant=False)
            block.forward = forward
            count += 1
    return count


def apply_compile(model: LensTransformer2DModel) -> None:
    for block in model.transformer_blocks:
        block.compile()


def apply_fsdp(model: LensTransformer2DModel, param_dtype: torch.dtype, reduce_dtype: torch.dtype,
               reshard_after_forward: bool = True) -> None:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # The root returns proj_out's output, a view; nothing here updates it in place.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    # Only the root casts its floating inputs to param_dtype. The blocks must not: their
    # inputs include the float32 RoPE table (cos, sin), which a bf16 cast would round
    # (and the fused qk_norm_rope op rejects); img/txt/temb reach them in param_dtype
    # already, as outputs of the root's own bf16 layers.
    mp_root = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    mp_block = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype, cast_forward_inputs=False)
    blocks = list(model.transformer_blocks)
    for i, block in enumerate(blocks):
        # The last block's parameters are needed again right away by backward.
        fully_shard(block, mp_policy=mp_block, reshard_after_forward=reshard_after_forward and i < len(blocks) - 1)
    # The root's parameters (embedders, norm_out, proj_out) are the first backward needs:
    # never reshard them after forward (what FSDP2 does for a root left on its default).
    fully_shard(model, mp_policy=mp_root, reshard_after_forward=False)


def reshard(model: nn.Module) -> None:
    """Drop FSDP2's gathered copies of ``model``'s parameters (a no-grad forward leaves
    modules that do not reshard after forward gathered), so that its parameters are the
    local shards again: before a weight swap or a shard-wise update. A no-op without FSDP."""
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole value of a (possibly sharded) tensor; a collective for DTensors."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def clip_grad_norm(params, max_norm: float) -> torch.Tensor:
    """Clip the global gradient norm (over all shards) to ``max_norm``; returns it."""
    grads = [p.grad for p in params if p.grad is not None]
    total = torch.nn.utils.get_total_norm(grads, 2.0, False, True)
    if isinstance(total, DTensor):
        total = total.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total, True)
    return total


class EMA:
    """Exponential moving average of the weights, in float32, with the parameters'
    own sharding (DTensors under FSDP), updated with foreach ops on the local shards."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.names = [n for n, _ in model.named_parameters()]
        with torch.no_grad():
            self.shadow = [p.detach().clone().float() for p in model.parameters()]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        params = [local(p.detach()) for p in model.parameters()]
        torch._foreach_lerp_([local(s) for s in self.shadow], params, 1.0 - self.decay)

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return dict(zip(self.names, self.shadow))

    @contextlib.contextmanager
    def swapped_into(self, model: nn.Module):
        """Run with the EMA weights in ``model`` (each rank swaps its own shards)."""
        params = list(model.parameters())

        def swap():
            with torch.no_grad():
                for p, s in zip(params, self.shadow):
                    lp, ls = local(p), local(s)
                    tmp = lp.clone()
                    lp.copy_(ls)
                    ls.copy_(tmp)
        swap()
        try:
            yield model
        finally:
            swap()


def dtype_of(name: str) -> torch.dtype:
    return resolve_dtype(name)
