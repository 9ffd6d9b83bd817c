"""How the pipeline and the CLI use a reasoner: building one by name, and rewriting a
batch of requests so that what reaches the text encoder fits it.

``rewrite_for_encoder`` rewrites each request, then checks the rewrite against the
encoder's limit (``max_sequence_length`` tokens of the whole rendered chat template): a
rewrite that would not fit is cut at a token boundary, keeping the template's end intact,
with a warning giving both token counts; never silently. The cut text is what is encoded,
returned and recorded.
"""
from __future__ import annotations

import logging
from typing import List, Optional, Sequence, Tuple, Union

from ..errors import InvalidValue
from .base import Reasoner, Rewrite, load_system_prompt

logger = logging.getLogger(__name__)

BACKENDS = ("local", "api")


def build_reasoner(backend: str, text_encoder=None, system_prompt: Optional[str] = None,
                   system_prompt_file: Optional[str] = None, cache_dir: Optional[str] = None,
                   checkpoint: Optional[str] = None, **backend_kwargs) -> Reasoner:
    """A ``Reasoner`` for ``backend`` "local" (the GPT-OSS of ``text_encoder``; ``checkpoint``:
    its folder) or "api" (the endpoint in ``LENS_FAST_REASONER_*``), with ``system_prompt``
    (text) or ``system_prompt_file`` (default: the packaged Lens system prompt)."""
    if system_prompt is not None and system_prompt_file is not None:
        raise InvalidValue("give system_prompt or system_prompt_file, not both")
    text = system_prompt if system_prompt is not None else load_system_prompt(system_prompt_file)
    if backend == "local":
        if text_encoder is None:
            raise InvalidValue("the local reasoner generates with the pipeline's GPT-OSS text encoder, and this "
                             "pipeline has none (model_index.json lists no text_encoder); use backend 'api'")
        from .local import LocalGptOssBackend

        chat = LocalGptOssBackend(text_encoder, checkpoint=checkpoint, **backend_kwargs)
    elif backend == "api":
        from .api import ApiBackend

        chat = ApiBackend.from_env(**backend_kwargs)
    else:
        raise InvalidValue(f"reasoner backend {backend!r}; expected one of {list(BACKENDS)} (or pass a Reasoner)")
    return Reasoner(chat, text, cache_dir=cache_dir)


def _token_count(text_encoder, prompt: str) -> int:
    render = getattr(text_encoder, "render", None)
    text = render(prompt) if callable(render) else prompt
    return len(text_encoder.tokenizer(text, add_special_tokens=True)["input_ids"])


def fit_to_encoder(text_encoder, prompt: str, max_sequence_length: int) -> Tuple[str, Optional[int]]:
    """(prompt, None) when it fits, else (the prompt cut to fit, its full token count)."""
    if text_encoder is None or getattr(text_encoder, "tokenizer", None) is None:
        return prompt, None
    total = _token_count(text_encoder, prompt)
    if total <= max_sequence_length:
        return prompt, None
    enc = text_encoder.tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)
    offsets = enc["offset_mapping"]
    keep = len(offsets) - (total - max_sequence_length)
    while keep > 0:
        cut = prompt[:offsets[keep - 1][1]].rstrip()
        if _token_count(text_encoder, cut) <= max_sequence_length:
            return cut, total
        keep -= 1
    raise InvalidValue(f"max_sequence_length={max_sequence_length} leaves no room for a prompt: the chat template "
                     "alone is longer; expected a larger max_sequence_length")


def rewrite_for_encoder(reasoner: Reasoner, text_encoder, prompt: Union[str, Sequence[str]],
                        max_sequence_length: int) -> Tuple[List[str], List[Rewrite]]:
    """(prompts to encode, one Rewrite per request): rewrites, cut to fit the encoder."""
    if not isinstance(reasoner, Reasoner):
        raise TypeError(f"reasoner={reasoner!r}: expected a lens_fast.reasoner.Reasoner (see build_reasoner)")
    requests = [prompt] if isinstance(prompt, str) else list(prompt)
    rewrites = reasoner.rewrite(requests)
    for r in rewrites:
        if not r.rewritten:
            continue
        cut, total = fit_to_encoder(text_encoder, r.prompt, max_sequence_length)
        if total is not None:
            logger.warning("the rewritten prompt is %d tokens with the chat template and the text encoder takes %d "
                           "(max_sequence_length): cut from %d to %d characters", total, max_sequence_length,
                           len(r.prompt), len(cut))
            r.prompt, r.reason = cut, f"cut to fit max_sequence_length={max_sequence_length} ({total} tokens)"
    return [r.prompt for r in rewrites], rewrites
