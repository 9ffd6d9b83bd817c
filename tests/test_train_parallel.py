"""FSDP2 wrapping of the model in one process (gloo, world size 1): mixed precision must
cast the root's inputs only, never the float32 RoPE table the blocks receive."""
import tempfile

import pytest
import torch
import torch.distributed as dist

from lens_fast.tiny import make_tiny_transformer
from lens_fast.train.parallel import apply_fsdp


@pytest.fixture
def one_rank_group():
    if not dist.is_available():
        pytest.skip("torch.distributed is not available in this build")
    dist.init_process_group("gloo", store=dist.FileStore(tempfile.mktemp(), 1), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_fsdp_bf16_params_keep_rope_float32_and_match_fp32(one_rank_group):
    model = make_tiny_transformer(seed=5).train()
    g = torch.Generator().manual_seed(0)
    c = model.config
    b, h, w, s = 2, 3, 5, 7
    mask = torch.ones(b, s, dtype=torch.bool)
    mask[1, 4:] = False
    kw = dict(hidden_states=torch.randn(b, h * w, c.in_channels, generator=g),
              encoder_hidden_states=[torch.randn(b, s, c.enc_hidden_dim, generator=g) for _ in c.selected_layer_index],
              encoder_hidden_states_mask=mask, timestep=torch.rand(b, generator=g), img_shapes=[(1, h, w)])
    with torch.no_grad():
        ref = model(**kw).sample
    apply_fsdp(model, torch.bfloat16, torch.float32)
    out = model(**kw).sample  # raised "rope is torch.bfloat16 ..." when blocks cast their inputs
    assert out.dtype == torch.bfloat16
    err = ((out.float() - ref).norm() / ref.norm()).item()
    assert err < 3e-2, err
    out.float().square().mean().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert "img_in.weight" in grads and "transformer_blocks.0.attn.img_qkv.weight" in grads
    assert all(torch.isfinite(gr.to_local() if hasattr(gr, "to_local") else gr).all() for gr in grads.values())


def test_model_output_is_a_pytree_node_so_fsdp_hooks_it():
    # FSDP2 before torch 2.13 registers its pre-backward hooks on tree_flatten(output):
    # an unregistered dataclass is one leaf and the root's all-gather never happens.
    from torch.utils._pytree import tree_flatten, tree_unflatten

    from lens_fast.models.transformer import Transformer2DModelOutput

    t = torch.randn(2, 3, requires_grad=True)
    leaves, spec = tree_flatten(Transformer2DModelOutput(sample=t))
    assert len(leaves) == 1 and leaves[0] is t
    assert tree_unflatten(leaves, spec).sample is t
