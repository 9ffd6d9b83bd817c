"""Tiny, offline fixtures for lens_fast tests: random miniature components saved in the
official Lens checkpoint-folder formats, so loaders run exactly as on the real folders.

Text-encoder fixtures (this section):
- ``make_tiny_gpt_oss(folder, ...)``: a random transformers ``GptOssForCausalLM`` (a few
  layers, sliding and full attention, a handful of experts), saved with
  ``save_pretrained`` (safetensors). With ``mxfp4=True`` the experts are written the way
  the official checkpoint stores them (MXFP4 ``*_blocks`` / ``*_scales`` plus an mxfp4
  ``quantization_config``), to exercise the dequantising load path on a CPU.
- ``make_tiny_tokenizer(folder)``: a harmony-style tokenizer built with the
  ``tokenizers`` library and a GPT-OSS-like chat template. Its design choice: a word-level
  vocabulary (BPE model with ``ignore_merges``, so whole vocabulary words are single
  tokens and anything else falls back to single characters) whose pre-tokenizer is
  tuned so that the fixed Lens template prefix is exactly ``TINY_TEMPLATE_PREFIX_TOKENS``
  (97) tokens long, like the official o200k-harmony tokenizer, for any date.

Denoiser / VAE fixture builders belong in their own section after the text-encoder one.
WebDataset shard fixtures (``write_tar``, ``captioned_sample``, ``image_bytes``) and the
``WordFeatures`` text-encoder stand-in serve the trainer's data and reliability tests.
"""
import json
import os
import zlib
from typing import Dict, List

import torch

# ----------------------------------------------------------------------------------------
# Text encoder fixtures
# ----------------------------------------------------------------------------------------

# The official template prefix (everything before the user's prompt) is 97 tokens long;
# the tiny tokenizer reproduces that count.
TINY_TEMPLATE_PREFIX_TOKENS = 97

HARMONY_SPECIAL_TOKENS = ["<|startoftext|>", "<|endoftext|>", "<|start|>", "<|message|>", "<|end|>",
                          "<|channel|>", "<|return|>", "<|call|>", "<|constrain|>"]
TINY_UNK = "[UNK]"

# Pre-tokenizer: words with an optional leading space; single digits (optional leading
# space) that absorb the newlines after them; punctuation runs that absorb the newlines
# after them (as o200k does); newline runs; other whitespace. Digits are single tokens,
# so the date stamped into the template never changes the token count; the newline
# rule for digits is what makes the fixed prefix exactly 97 tokens.
TINY_SPLIT_PATTERN = r" ?[A-Za-z]+| ?[0-9][\r\n]*| ?[^\sA-Za-z0-9]+[\r\n]*|\s*[\r\n]+|\s+"

# Words of the template plus a small test vocabulary; each becomes a token with and
# without a leading space.
_TEMPLATE_WORDS = (
    "You are ChatGPT a large language model trained by OpenAI Knowledge cutoff Current date "
    "Reasoning medium low high Valid channels analysis commentary final Channel must be included "
    "for every message Instructions Describe the image by detailing color shape size texture "
    "quantity text spatial relationships of objects and background Need to generate one "
    "according description system developer user assistant"
)
_TEST_WORDS = (
    "a an the one two three four five red green blue yellow black white orange purple pink "
    "gray brown cat dog bird car tree house cube sphere circle square triangle star moon sun "
    "sky sea mountain flower on in under over next left right top bottom small big tall short "
    "with is of and photo painting drawing sitting standing bright dark shiny wooden table "
    "chair book cup apple banana street city night day light"
)


def _tiny_vocab() -> Dict[str, int]:
    tokens: List[str] = list(HARMONY_SPECIAL_TOKENS) + [TINY_UNK]
    tokens += [chr(c) for c in range(32, 127)] + ["\n", "\r", "\t"]
    tokens += ["\n\n", "\n\n\n", " \n", "  ", "   "]
    for d in "0123456789":
        for lead in ("", " "):
            tokens += [lead + d + "\n", lead + d + "\n\n"] + ([" " + d] if lead else [])
    for p in ".,:;!?-#":
        tokens += [p + "\n", p + "\n\n", " " + p]
    words = sorted(set(_TEMPLATE_WORDS.split()) | set(_TEST_WORDS.split()))
    for w in words:
        tokens += [w, " " + w, w.capitalize(), " " + w.capitalize()]
    vocab: Dict[str, int] = {}
    for t in tokens:
        vocab.setdefault(t, len(vocab))
    return vocab


# A GPT-OSS-style (harmony) chat template: system block with the current date from
# strftime_now (inside a macro, as in the official template), the system message as the
# developer "# Instructions", then users and assistants; an assistant's thinking goes to
# the analysis channel, its content to the final channel, ended by <|return|> when it is
# the last message.
TINY_HARMONY_CHAT_TEMPLATE = (
    "{%- macro build_system_message() -%}"
    "{{- 'You are ChatGPT, a large language model trained by OpenAI.\\n' -}}"
    "{{- 'Knowledge cutoff: 2024-06\\n' -}}"
    "{{- 'Current date: ' + strftime_now('%Y-%m-%d') + '\\n\\n' -}}"
    "{%- if reasoning_effort is not defined %}{% set reasoning_effort = 'medium' %}{% endif -%}"
    "{{- 'Reasoning: ' + reasoning_effort + '\\n\\n' -}}"
    "{{- '# Valid channels: analysis, commentary, final. Channel must be included for every message.' -}}"
    "{%- endmacro -%}"
    "{{- '<|start|>system<|message|>' -}}{{- build_system_message() -}}{{- '<|end|>' -}}"
    "{%- if messages and messages[0].role in ['system', 'developer'] -%}"
    "{{- '<|start|>developer<|message|># Instructions\\n\\n' + messages[0].content + '\\n\\n<|end|>' -}}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if message.role == 'user' -%}"
    "{{- '<|start|>user<|message|>' + message.content + '<|end|>' -}}"
    "{%- elif message.role == 'assistant' -%}"
    "{%- if message.thinking -%}"
    "{{- '<|start|>assistant<|channel|>analysis<|message|>' + message.thinking + '<|end|>' -}}"
    "{%- endif -%}"
    "{{- '<|start|>assistant<|channel|>final<|message|>' + (message.content or '') -}}"
    "{%- if loop.last -%}{{- '<|return|>' -}}{%- else -%}{{- '<|end|>' -}}{%- endif -%}"
    "{%- else -%}"
    "{{- raise_exception('tiny harmony template: unsupported role ' + message.role) -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|start|>assistant' -}}{%- endif -%}"
)


def build_tiny_tokenizer():
    """Returns the tiny harmony tokenizer as a ``PreTrainedTokenizerFast`` (not saved)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = _tiny_vocab()
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=TINY_UNK, ignore_merges=True))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(TINY_SPLIT_PATTERN), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in HARMONY_SPECIAL_TOKENS])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|startoftext|>", eos_token="<|return|>",
        pad_token="<|endoftext|>", unk_token=TINY_UNK, padding_side="right",
        model_max_length=131072, clean_up_tokenization_spaces=False)
    tok.chat_template = TINY_HARMONY_CHAT_TEMPLATE
    return tok


def make_tiny_tokenizer(folder) -> str:
    """Saves the tiny harmony tokenizer into ``folder`` (normally ``<ckpt>/tokenizer``) with
    ``save_pretrained``; returns the folder path."""
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    build_tiny_tokenizer().save_pretrained(folder)
    return folder


def tiny_gpt_oss_config(num_layers: int = 6, hidden: int = 40, vocab_size: int = None):
    """Config of the tiny GPT-OSS: 2 heads of 16 dims (1 KV head), 4 experts (top-2),
    sliding window 8 on alternate layers (as the official model alternates them)."""
    from transformers import GptOssConfig

    if int(num_layers) < 1 or int(hidden) < 2:
        raise ValueError(f"num_layers={num_layers}, hidden={hidden}; expected num_layers >= 1 and hidden >= 2")
    vocab_size = vocab_size or len(_tiny_vocab())
    return GptOssConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=hidden, num_hidden_layers=num_layers,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, num_local_experts=4, num_experts_per_tok=2,
        sliding_window=8, max_position_embeddings=4096, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        pad_token_id=1, bos_token_id=0, eos_token_id=6, tie_word_embeddings=False)


def make_tiny_gpt_oss(folder, num_layers: int = 6, hidden: int = 40, seed: int = 0, mxfp4: bool = False):
    """Saves a random tiny ``GptOssForCausalLM`` (float32 safetensors) into ``folder``
    (normally ``<ckpt>/text_encoder``) and returns the model (float32, eval mode).

    With ``mxfp4=True`` the expert weights are first rounded to MXFP4 and stored as the
    official checkpoint stores them (``*_blocks`` uint8 pairs of FP4 codes, ``*_scales``
    uint8 biased exponents per 32 values, ``quantization_config={"quant_method": "mxfp4"}``);
    the returned model then holds exactly the dequantised weights. ``hidden`` must be a
    multiple of 32 for that."""
    from safetensors.torch import save_file
    from transformers import GptOssForCausalLM

    folder = os.fspath(folder)
    if mxfp4 and int(hidden) % 32:
        raise ValueError(f"hidden={hidden}; MXFP4 packs 32 values per scale, so expected a multiple of 32")
    torch.manual_seed(int(seed))
    model = GptOssForCausalLM(tiny_gpt_oss_config(num_layers, hidden)).float().eval()
    with torch.no_grad():  # the default init (std 0.02) makes every layer nearly the identity
        for name, p in model.named_parameters():
            if p.dim() >= 2 and "norm" not in name:
                p.normal_(0.0, 0.2)
            elif name.endswith("bias") or name.endswith("sinks"):
                p.normal_(0.0, 0.1)
    if not mxfp4:
        model.save_pretrained(folder, safe_serialization=True)
        return model
    os.makedirs(folder, exist_ok=True)
    tensors = {}
    for name, p in model.state_dict().items():
        proj = name.rsplit(".", 1)[-1]
        if ".mlp.experts." in name and proj in ("gate_up_proj", "down_proj"):
            blocks, scales = _mxfp4_pack(p.transpose(1, 2))  # stored as [experts, out, in]
            with torch.no_grad():
                p.copy_(_mxfp4_unpack(blocks, scales).transpose(1, 2))
            tensors[name + "_blocks"], tensors[name + "_scales"] = blocks, scales
        else:
            tensors[name] = p.detach().contiguous()
    save_file(tensors, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, default=str)
    return model


_FP4_E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def _mxfp4_pack(w: torch.Tensor):
    """Rounds ``w`` [..., K] (K a multiple of 32) to MXFP4: returns (blocks [..., K/32, 16]
    uint8, low nibble first; scales [..., K/32] uint8 exponents biased by 127)."""
    *lead, k = w.shape
    groups = w.float().reshape(*lead, k // 32, 32)
    amax = groups.abs().amax(-1, keepdim=True).clamp_min(2.0 ** -100)
    exp = torch.floor(torch.log2(amax)) - 2  # largest FP4 magnitude is 6 = 1.5 * 2^2
    scaled = groups / torch.exp2(exp)
    mag = (scaled.abs().unsqueeze(-1) - _FP4_E2M1).abs().argmin(-1)
    codes = (mag | ((scaled < 0) & (mag > 0)).long() << 3).to(torch.uint8)
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return blocks.contiguous(), (exp.squeeze(-1) + 127).to(torch.uint8).contiguous()


def _mxfp4_unpack(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Inverse of ``_mxfp4_pack``: float32 [..., K]."""
    lut = torch.cat([_FP4_E2M1, -_FP4_E2M1])
    codes = torch.stack([blocks & 0x0F, blocks >> 4], dim=-1).flatten(-2).long()
    vals = lut[codes] * torch.exp2(scales.float() - 127).unsqueeze(-1)
    return vals.flatten(-2)


def make_tiny_text_encoder_checkpoint(folder, num_layers: int = 6, hidden: int = 40, seed: int = 0,
                                      mxfp4: bool = False):
    """Writes ``<folder>/text_encoder`` and ``<folder>/tokenizer``; returns the model."""
    folder = os.fspath(folder)
    make_tiny_tokenizer(os.path.join(folder, "tokenizer"))
    return make_tiny_gpt_oss(os.path.join(folder, "text_encoder"), num_layers, hidden, seed, mxfp4=mxfp4)


# ----------------------------------------------------------------------------------------
# WebDataset shard fixtures
# ----------------------------------------------------------------------------------------

def image_bytes(w: int, h: int, seed: int, fmt: str = "PNG") -> bytes:
    """A random RGB image of w x h pixels, encoded."""
    import io

    import numpy as np
    from PIL import Image

    arr = (np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def write_tar(path, samples, cut_last=None) -> str:
    """A WebDataset shard. ``samples``: [(key, {ext: bytes})]; ``cut_last``: keep only
    this many bytes of the archive (a truncated shard)."""
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, files in samples:
            for ext, data in files.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    data = buf.getvalue()
    if cut_last is not None:
        data = data[:cut_last]
    with open(path, "wb") as f:
        f.write(data)
    return str(path)


def captioned_sample(key: str, w: int = 40, h: int = 40, caption: str = None, seed: int = 0):
    """(key, {png, json caption}) for ``write_tar``."""
    return key, {"png": image_bytes(w, h, seed), "json": json.dumps({"caption": caption or key}).encode()}


class WordFeatures:
    """A text-encoder stand-in for trainer tests: each word maps to fixed random
    vectors (one table per layer); ``encode`` has ``LensTextEncoder.encode``'s signature."""

    def __init__(self, layers, dim):
        self.table = torch.randn(layers, 256, dim, generator=torch.Generator().manual_seed(0))

    def encode(self, captions, max_sequence_length, device):
        ids = [[zlib.crc32(w.encode()) % 256 for w in c.split()][:max_sequence_length] or [0] for c in captions]
        s = max(map(len, ids))
        mask = torch.zeros(len(ids), s, dtype=torch.bool)
        idx = torch.zeros(len(ids), s, dtype=torch.long)
        for i, row in enumerate(ids):
            mask[i, :len(row)] = True
            idx[i, :len(row)] = torch.as_tensor(row)
        return [t[idx] * mask[..., None] for t in self.table], mask
