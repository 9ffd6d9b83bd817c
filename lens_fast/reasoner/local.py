"""The ``local`` reasoner backend: the GPT-OSS weights the pipeline already holds as its
text encoder generate the rewrite.

Generation shares every module with ``LensTextEncoder`` (embeddings, all decoder layers,
the final norm that the decoder applies) and adds only the LM head: the loaded model's
own when the encoder holds the whole causal LM (nothing new is loaded), else, for an
encoder that holds the bare decoder, that one tensor (``lm_head.weight``, or the
embeddings when the config ties them) read from the checkpoint's safetensors the first
time a rewrite is asked for. The conversation is rendered with the tokenizer's harmony chat
template (system prompt as the developer instructions, ``reasoning_effort="low"``, the
encoder's fixed template date when it has one), decoded token by token with a KV cache
until ``<|return|>`` / ``<|call|>`` (or ``<|end|>`` closing the final channel), and the
final channel's text is the answer; the analysis channel is dropped. Greedy by default;
``temperature > 0`` samples (``top_p`` nucleus) from a generator seeded with ``seed`` for
each request, so a rewrite does not depend on what was asked before it.

Any of these is a ``RewriteError`` (and the Reasoner falls back to the request): no final
channel in the output, a final answer cut at ``max_new_tokens``, ``timeout_s`` exceeded.
Requests are generated one at a time.
"""
from __future__ import annotations

import inspect
import json
import os
import time
from typing import List, Optional

import torch
import torch.nn.functional as F

from ..errors import InvalidValue, MissingFile
from ..text_encoder import _decoder_stack, set_template_date
from .base import RewriteError

FINAL_HEADER = "<|channel|>final"
MESSAGE = "<|message|>"
END_TOKENS = ("<|return|>", "<|end|>", "<|call|>")


def parse_final_channel(text: str) -> str:
    """The text of the last final-channel message in a harmony completion; RewriteError
    when there is none or it was never closed (the output was cut)."""
    start = text.rfind(FINAL_HEADER)
    if start < 0:
        raise RewriteError(f"no final channel in the model's output: {text[:120]!r}")
    body = text.find(MESSAGE, start)
    if body < 0:
        raise RewriteError(f"the final channel has no message: {text[start:start + 120]!r}")
    body += len(MESSAGE)
    ends = [i for i in (text.find(t, body) for t in END_TOKENS) if i >= 0]
    if not ends:
        raise RewriteError("the final answer was cut before it ended (raise max_new_tokens)")
    return text[body:min(ends)].strip()


def _weights_index(folder: str) -> dict:
    """tensor name -> safetensors file in a transformers model folder."""
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            return {k: os.path.join(folder, v) for k, v in json.load(f)["weight_map"].items()}
    from safetensors import safe_open

    names = {}
    for fname in sorted(os.listdir(folder)):
        if fname.endswith(".safetensors"):
            with safe_open(os.path.join(folder, fname), framework="pt") as f:
                names.update({k: os.path.join(folder, fname) for k in f.keys()})
    return names


def load_lm_head(folder: str, config) -> torch.Tensor:
    """The LM head weight [vocab, hidden] of a GPT-OSS checkpoint folder, read alone."""
    from safetensors import safe_open

    index = _weights_index(folder)
    name = "lm_head.weight"
    if name not in index and getattr(config, "tie_word_embeddings", False):
        name = "model.embed_tokens.weight"
    if name not in index:
        raise MissingFile(f"{folder} holds no lm_head.weight; the local reasoner needs the GPT-OSS LM head "
                                "(expected the full causal LM checkpoint)")
    with safe_open(index[name], framework="pt") as f:
        return f.get_tensor(name)


class LocalGptOssBackend:
    """Generation with a ``LensTextEncoder``'s GPT-OSS (module docstring). ``checkpoint``:
    the text encoder's folder, where a bare decoder's LM head is read from (default: the
    folder transformers loaded the model from); ``lm_head``: a weight [vocab, hidden] to
    use instead."""

    name = "local"

    def __init__(self, text_encoder, max_new_tokens: int = 768, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int = 0, reasoning_effort: str = "low", timeout_s: Optional[float] = None,
                 checkpoint: Optional[str] = None, lm_head: Optional[torch.Tensor] = None):
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise InvalidValue(f"max_new_tokens={max_new_tokens!r}: expected an int >= 1")
        if not temperature >= 0 or not 0 < top_p <= 1:
            raise InvalidValue(f"temperature={temperature!r}, top_p={top_p!r}: expected temperature >= 0 and "
                             "0 < top_p <= 1")
        if reasoning_effort not in ("low", "medium", "high"):
            raise InvalidValue(f"reasoning_effort={reasoning_effort!r}; expected 'low', 'medium' or 'high'")
        if timeout_s is not None and not timeout_s > 0:
            raise InvalidValue(f"timeout_s={timeout_s!r}: expected a positive number of seconds or None")
        self.encoder = text_encoder
        self.tokenizer = text_encoder.tokenizer
        self.decoder, _ = _decoder_stack(text_encoder.model)
        if not isinstance(getattr(self.decoder, "norm", None), torch.nn.Module):
            raise TypeError(f"{type(self.decoder).__name__} has no final norm; expected a GPT-OSS decoder")
        self.max_new_tokens, self.temperature, self.top_p = max_new_tokens, float(temperature), float(top_p)
        self.seed, self.reasoning_effort, self.timeout_s = int(seed), reasoning_effort, timeout_s
        self._lm_head = lm_head
        loaded_from = getattr(text_encoder.model.config, "_name_or_path", "") or ""
        self.checkpoint = checkpoint or (loaded_from if os.path.isdir(loaded_from) else None)
        self.model = self.checkpoint or loaded_from or "gpt-oss"
        vocab = self.tokenizer.get_vocab()
        self._stop = {vocab[t] for t in ("<|return|>", "<|call|>") if t in vocab}
        if self.tokenizer.eos_token_id is not None:
            self._stop.add(self.tokenizer.eos_token_id)
        self._end = vocab.get("<|end|>")
        self._message = vocab.get(MESSAGE)
        # transformers renamed the decoder's past_key_values= (and the output field) to cache= in 5.x
        self._cache_name = "cache" if "cache" in inspect.signature(self.decoder.forward).parameters \
            else "past_key_values"

    def settings(self) -> dict:
        return {"max_new_tokens": self.max_new_tokens, "temperature": self.temperature, "top_p": self.top_p,
                "seed": self.seed if self.temperature > 0 else None, "reasoning_effort": self.reasoning_effort,
                "template_date": self.encoder.template_date}

    # -- the only weights generation adds --------------------------------------------------
    def lm_head(self) -> torch.Tensor:
        if self._lm_head is None:
            model = self.encoder.model
            head = getattr(model, "lm_head", None)
            if isinstance(head, torch.nn.Linear):
                self._lm_head = head.weight
            else:
                if not self.checkpoint:
                    raise RewriteError("the text encoder holds no LM head and its checkpoint folder is unknown; "
                                       "pass checkpoint=<folder>/text_encoder or lm_head=")
                self._lm_head = load_lm_head(self.checkpoint, model.config)
        param = next(self.decoder.parameters())
        if self._lm_head.device != param.device or self._lm_head.dtype != param.dtype:
            self._lm_head = self._lm_head.to(device=param.device, dtype=param.dtype)
        return self._lm_head

    # -- generation ---------------------------------------------------------------------------
    def render(self, system: str, user: str) -> str:
        conversation = [{"role": "system", "content": system}, {"role": "user", "content": user}]
        text = self.tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True,
                                                  reasoning_effort=self.reasoning_effort)
        if self.encoder.template_date is not None:
            text, _ = set_template_date(text, self.encoder.template_date)
        return text

    def _pick(self, logits: torch.Tensor, generator: Optional[torch.Generator]) -> int:
        if self.temperature == 0:
            return int(logits.argmax())
        probs = torch.softmax(logits.float() / self.temperature, dim=-1).cpu()
        if self.top_p < 1:
            sorted_p, order = probs.sort(descending=True)
            keep = sorted_p.cumsum(-1) - sorted_p < self.top_p
            probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
        return int(torch.multinomial(probs, 1, generator=generator))

    @torch.no_grad()
    def generate_ids(self, prompt_ids: List[int]) -> List[int]:
        """Token ids generated after ``prompt_ids`` (stop token included when reached)."""
        head = self.lm_head()
        device = head.device
        generator = torch.Generator().manual_seed(self.seed) if self.temperature > 0 else None
        deadline = None if self.timeout_s is None else time.monotonic() + self.timeout_s
        out = self.decoder(input_ids=torch.tensor([prompt_ids], device=device), use_cache=True)
        generated: List[int] = []
        in_final = False
        for _ in range(self.max_new_tokens):
            token = self._pick(F.linear(out.last_hidden_state[0, -1], head), generator)
            generated.append(token)
            if token == self._message:
                in_final = FINAL_HEADER in self.tokenizer.decode(generated[-8:], skip_special_tokens=False)
            if token in self._stop or (in_final and token == self._end):
                break
            if deadline is not None and time.monotonic() > deadline:
                raise RewriteError(f"generation timed out after {self.timeout_s:g} s")
            past = {self._cache_name: getattr(out, self._cache_name)}
            out = self.decoder(input_ids=torch.tensor([[token]], device=device), use_cache=True, **past)
        return generated

    def complete(self, system: str, user: str) -> str:
        """The raw harmony completion (all channels, special tokens kept)."""
        ids = self.tokenizer(self.render(system, user), add_special_tokens=False)["input_ids"]
        return self.tokenizer.decode(self.generate_ids(ids), skip_special_tokens=False)

    def chat(self, system: str, user: str) -> str:
        return parse_final_channel(self.complete(system, user))
