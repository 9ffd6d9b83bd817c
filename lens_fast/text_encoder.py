"""Lens text encoding: GPT-OSS chat-template rendering, tokenisation and multi-layer
features, as the reference Lens pipeline computes them.

Each prompt is rendered with the tokenizer's (harmony) chat template from the Lens
conversation (system = CHAT_SYSTEM, user = prompt, assistant thinking = CHAT_THINKING),
cut at the first ``<|return|>``, tokenised as one right-padded batch, and run through
the GPT-OSS decoder; the features are the outputs of decoder layers
``selected_layer_index`` (0-based, before any final norm) with the first
``DEFAULT_TXT_OFFSET`` (97) tokens, the fixed template prefix, dropped.

Design choices:
- Early exit: forward hooks capture the selected layers' outputs and the hook on the
  last selected layer raises a private exception, so later layers, the final norm and
  the LM head never run. This keeps transformers' own mask construction (sliding and
  full attention layers) untouched instead of re-implementing the decoder loop.
- Reproducible dates: the official template stamps ``strftime_now("%Y-%m-%d")`` into a
  "Current date: YYYY-MM-DD" line, and transformers 5 passes template kwargs through as
  plain data (a clock function cannot be injected), so a fixed date is substituted into
  that line after rendering. A template that stamps no such line: an explicit
  ``template_date`` is an error (the request cannot be honoured); a date that came from
  ``LENS_FAST_TEMPLATE_DATE`` is ignored with a one-time warning.
- Optional LRU cache of per-prompt features keyed by (prompt, date, max_sequence_length,
  plus the selected layers and offset). With the cache on, padded positions of a batch
  are zeros (without it they hold the model's outputs at pad tokens, as in the
  reference); the valid positions are the same either way.
"""
import importlib.metadata
import logging
import operator
import os
import re
from collections import OrderedDict
from datetime import date as _date
from datetime import datetime
from typing import List, Optional, Sequence, Tuple, Union

import torch
from safetensors import SafetensorError

from .errors import CorruptFile, InvalidValue, MissingFile, one_line
from .models.config import read_json
from .models.loading import check_weights_folder, resolve_dtype

logger = logging.getLogger(__name__)

CHAT_SYSTEM = ("Describe the image by detailing the color, shape, size, texture, quantity, text, "
               "spatial relationships of the objects and background.")
CHAT_THINKING = "Need to generate one image according to the description."
DEFAULT_TXT_OFFSET = 97
DEFAULT_MAX_SEQUENCE_LENGTH = 512
TEMPLATE_DATE_ENV = "LENS_FAST_TEMPLATE_DATE"

_DATE_LINE = re.compile(r"(Current date: )(\d{4}-\d{2}-\d{2})")
_RETURN_TOKEN = "<|return|>"


def lens_conversation(prompt: str) -> list:
    """The conversation the Lens reference renders for one prompt."""
    return [{"role": "system", "content": CHAT_SYSTEM, "thinking": None},
            {"role": "user", "content": prompt, "thinking": None},
            {"role": "assistant", "thinking": CHAT_THINKING, "content": ""}]


def validate_template_date(value: Union[str, _date], source: str = "template_date") -> str:
    """Returns ``value`` as a 'YYYY-MM-DD' string; raises ValueError naming ``source``."""
    if isinstance(value, _date):
        return value.strftime("%Y-%m-%d")
    if isinstance(value, str) and re.fullmatch(r"\d{4}-\d{2}-\d{2}", value):
        try:
            datetime.strptime(value, "%Y-%m-%d")
            return value
        except ValueError:
            pass
    raise InvalidValue(f"{source}={value!r}; expected a real calendar date written YYYY-MM-DD (e.g. '2025-08-05')")


def set_template_date(text: str, date: str) -> Tuple[str, bool]:
    """Replaces the first "Current date: YYYY-MM-DD" stamp in ``text`` by ``date``;
    returns (text, whether a stamp was found)."""
    new, n = _DATE_LINE.subn(lambda m: m.group(1) + date, text, count=1)
    return new, n == 1


class _StopAfterLastSelectedLayer(Exception):
    """Raised by the hook on the last selected layer to skip the rest of the forward."""


def _decoder_stack(model) -> Tuple[torch.nn.Module, torch.nn.ModuleList]:
    """(module to call, its decoder layers) for a CausalLM (``model.model.layers``) or a
    bare decoder (``model.layers``)."""
    inner = getattr(model, "model", None)
    if inner is not None and isinstance(getattr(inner, "layers", None), torch.nn.ModuleList):
        return inner, inner.layers
    if isinstance(getattr(model, "layers", None), torch.nn.ModuleList):
        return model, model.layers
    raise TypeError(f"{type(model).__name__} has neither .model.layers nor .layers; expected a GPT-OSS "
                    "causal LM (GptOssForCausalLM) or its decoder (GptOssModel)")


def _distribution_installed(name: str) -> bool:
    # Installed-distribution metadata, not an import probe: a source checkout of this
    # project has its own top-level kernels/ folder that must not count as the hub's
    # ``kernels`` package.
    try:
        importlib.metadata.version(name)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def _transformers_version() -> Tuple[int, int]:
    import transformers

    major, minor = (re.findall(r"\d+", transformers.__version__) + ["0", "0"])[:2]
    return int(major), int(minor)


def _mxfp4_kernels_usable(device) -> bool:
    """Whether transformers' fast MXFP4 path can run: a CUDA device (sm75+) with the
    triton and ``kernels`` packages installed."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type != "cuda" or not torch.cuda.is_available():
        return False
    if torch.cuda.get_device_capability(dev) < (7, 5):
        return False
    return _distribution_installed("triton") and _distribution_installed("kernels")


class LensTextEncoder:
    """GPT-OSS text encoder of Lens: ``encode(prompts)`` -> (features, mask).

    ``features`` is a list (one per selected layer, in ``selected_layer_index`` order) of
    [B, S, hidden] tensors and ``mask`` a [B, S] bool tensor, S = padded token count
    minus ``txt_offset`` (0 when no prompt is longer than the offset)."""

    def __init__(self, model, tokenizer, selected_layer_index: Sequence[int], txt_offset: int = DEFAULT_TXT_OFFSET,
                 template_date: Optional[Union[str, _date]] = None, cache_size: int = 0,
                 cache_device: Optional[Union[str, torch.device]] = None):
        self.model = model
        self.tokenizer = tokenizer
        self._base, self._layers = _decoder_stack(model)
        n_layers = len(self._layers)
        if isinstance(selected_layer_index, int):
            selected_layer_index = [selected_layer_index]
        try:
            given = list(selected_layer_index)
            layers = [operator.index(i) for i in given if not isinstance(i, bool)]
        except TypeError:
            given, layers = None, []
        if not layers or len(layers) != len(given):
            raise ValueError(f"selected_layer_index={selected_layer_index!r}; expected a non-empty list of ints")
        bad = [i for i in layers if not 0 <= i < n_layers]
        if bad:
            raise ValueError(f"selected_layer_index={layers} has {bad} outside [0, {n_layers - 1}]: "
                             f"the text encoder has {n_layers} decoder layers")
        self.selected_layer_index = layers
        if not isinstance(txt_offset, int) or txt_offset < 0:
            raise ValueError(f"txt_offset={txt_offset!r}; expected an int >= 0")
        self.txt_offset = txt_offset
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError(f"{type(tokenizer).__name__} has no chat_template; expected the GPT-OSS harmony "
                             "chat template that Lens renders prompts with")
        if tokenizer.pad_token is None:
            if tokenizer.eos_token is None:
                raise ValueError("the tokenizer has neither a pad token nor an eos token to pad with")
            tokenizer.pad_token = tokenizer.eos_token
        self.template_date = template_date
        if template_date is None and os.environ.get(TEMPLATE_DATE_ENV):
            self._template_date = validate_template_date(os.environ[TEMPLATE_DATE_ENV], source=TEMPLATE_DATE_ENV)
        self._warned_no_date_line = False
        if not isinstance(cache_size, int) or cache_size < 0:
            raise ValueError(f"cache_size={cache_size!r}; expected an int >= 0 (0 turns the cache off)")
        self.cache_size = cache_size
        self.cache_device = torch.device(cache_device) if cache_device is not None else None
        self._cache: "OrderedDict[tuple, Tuple[torch.Tensor, ...]]" = OrderedDict()
        self._hits = 0
        self._misses = 0

    # -- loading -------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, folder, selected_layer_index: Sequence[int], torch_dtype=None, device=None,
                        template_date: Optional[Union[str, _date]] = None, txt_offset: int = DEFAULT_TXT_OFFSET,
                        cache_size: int = 0, cache_device=None, dequantize_mxfp4: Optional[bool] = None,
                        text_encoder_subfolder: str = "text_encoder",
                        tokenizer_subfolder: str = "tokenizer", variant: Optional[str] = None) -> "LensTextEncoder":
        """Loads ``<folder>/text_encoder`` (GPT-OSS causal LM) and ``<folder>/tokenizer``.

        An MXFP4-quantised text encoder (the official one) is dequantised at load
        (``Mxfp4Config(dequantize=True)``, bfloat16 unless ``torch_dtype`` says otherwise)
        when the fast kernels cannot run (no CUDA device, no triton / ``kernels``
        package); ``dequantize_mxfp4=True`` forces dequantising, ``False`` leaves the
        MXFP4 weights to transformers (which still dequantises where it cannot run them).
        ``variant``: the weight-file variant (``model.fp16.safetensors``).
        ``device`` loads straight onto that device when accelerate is installed, else
        the model is loaded on the CPU and moved."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        folder = os.fspath(folder)
        if not os.path.isdir(folder):
            raise MissingFile(f"Lens checkpoint folder {folder!r} does not exist; expected a folder with "
                              f"{text_encoder_subfolder}/ and {tokenizer_subfolder}/")
        te_dir = os.path.join(folder, text_encoder_subfolder)
        tok_dir = os.path.join(folder, tokenizer_subfolder)
        for path, what in ((te_dir, "the GPT-OSS text encoder (config.json + safetensors)"),
                           (tok_dir, "the GPT-OSS harmony tokenizer")):
            if not os.path.isdir(path):
                raise MissingFile(f"{path} is missing; expected a folder holding {what}")
        config_path = os.path.join(te_dir, "config.json")
        if not os.path.isfile(config_path):
            raise MissingFile(f"{config_path} is missing; expected the text encoder's transformers config")
        check_weights_folder(te_dir, "the text encoder")
        tokenizer_files = [f for f in ("tokenizer.json", "tokenizer_config.json")
                           if os.path.isfile(os.path.join(tok_dir, f))]
        if not tokenizer_files:
            raise MissingFile(f"{tok_dir} holds neither tokenizer.json nor tokenizer_config.json")
        for name in tokenizer_files:
            read_json(os.path.join(tok_dir, name))
        config = read_json(config_path)

        dtype = resolve_dtype(torch_dtype)
        kwargs = {"use_safetensors": True}  # never let transformers fall back to pickle weights
        if variant is not None:
            kwargs["variant"] = variant
        quant = config.get("quantization_config") or {}
        if quant.get("quant_method") == "mxfp4":
            dequantize = (not _mxfp4_kernels_usable(device)) if dequantize_mxfp4 is None else bool(dequantize_mxfp4)
            if dequantize:
                try:
                    from transformers import Mxfp4Config
                except ImportError:
                    import transformers
                    raise ImportError(f"{te_dir} is MXFP4-quantised, but transformers {transformers.__version__} "
                                      "has no Mxfp4Config to dequantise it; expected transformers >= 4.55") from None
                kwargs["quantization_config"] = Mxfp4Config(dequantize=True)
                dtype = dtype or torch.bfloat16
        use_device_map = device is not None and _distribution_installed("accelerate")
        if use_device_map:
            kwargs["device_map"] = str(torch.device(device))
        # transformers renamed torch_dtype= to dtype= in 4.56 (the project supports >= 4.55)
        kwargs["dtype" if _transformers_version() >= (4, 56) else "torch_dtype"] = dtype or "auto"
        try:
            model = AutoModelForCausalLM.from_pretrained(te_dir, **kwargs)
        except (OSError, ValueError, RuntimeError, SafetensorError) as e:
            raise CorruptFile(f"cannot load the text encoder from {te_dir}: {one_line(e)}") from None
        if device is not None and not use_device_map:
            model = model.to(device)
        model.eval().requires_grad_(False)
        try:
            tokenizer = AutoTokenizer.from_pretrained(tok_dir)
        except Exception as e:  # noqa: BLE001 - tokenizers raises plain Exception for a malformed file
            raise CorruptFile(f"cannot load the tokenizer from {tok_dir}: {one_line(e)}") from None
        return cls(model, tokenizer, selected_layer_index, txt_offset=txt_offset, template_date=template_date,
                   cache_size=cache_size, cache_device=cache_device)

    # -- properties ----------------------------------------------------------------------
    @property
    def template_date(self) -> Optional[str]:
        """The 'YYYY-MM-DD' date stamped into every rendering, or None for the template's
        own clock (today). Setting it validates the date; a date set here (or passed to
        the constructor) is explicit, so a template without a date line is an error."""
        return self._template_date

    @template_date.setter
    def template_date(self, value: Optional[Union[str, _date]]) -> None:
        self._template_date = None if value is None else validate_template_date(value)
        self._date_explicit = value is not None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    def to(self, device=None, dtype=None) -> "LensTextEncoder":
        """Moves (and optionally casts) the model; cached features stay where they are."""
        self.model.to(device=device, dtype=resolve_dtype(dtype))
        return self

    # -- text -----------------------------------------------------------------------------
    def _today(self) -> str:
        return self.template_date or datetime.now().strftime("%Y-%m-%d")

    def render(self, prompt: str, template_date: Optional[Union[str, _date]] = None) -> str:
        """The chat-template text of one prompt, cut before the first ``<|return|>``, with
        the date fixed to ``template_date`` (default: the encoder's date, if any)."""
        if template_date is not None:
            return self._render(prompt, validate_template_date(template_date), strict=True)
        return self._render(prompt, self.template_date, strict=self._date_explicit)

    def _render(self, prompt: str, date: Optional[str], strict: bool) -> str:
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a str, got {type(prompt).__name__}: {prompt!r}")
        text = self.tokenizer.apply_chat_template(lens_conversation(prompt), tokenize=False,
                                                  add_generation_prompt=False)
        if date is not None:
            text, found = set_template_date(text, date)
            if not found and strict:
                raise ValueError(f"template_date={date!r} was requested, but the chat template stamps no "
                                 "'Current date: YYYY-MM-DD' line to fix; expected the GPT-OSS harmony template")
            if not found and self.template_date is not None and not self._warned_no_date_line:
                logger.warning("%s=%s ignored: the chat template stamps no 'Current date:' line",
                               TEMPLATE_DATE_ENV, date)
                self._warned_no_date_line = True
        return text.split(_RETURN_TOKEN)[0]

    def tokenize(self, prompts: Union[str, List[str]], max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH
                 ) -> Tuple[torch.Tensor, torch.Tensor]:
        """(input_ids [B, L] long, attention_mask [B, L] long) on the CPU: rendered prompts,
        right-padded to the longest, truncated at ``max_sequence_length``."""
        return self._tokenize(self._check_prompts(prompts), self._check_max_len(max_sequence_length),
                              self.template_date, self._date_explicit)

    def _tokenize(self, prompts: List[str], max_len: int, date: Optional[str], strict: bool):
        texts = [self._render(p, date, strict) for p in prompts]
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=max_len, add_special_tokens=True,
                             return_attention_mask=True, return_tensors="pt", padding_side="right")
        return enc["input_ids"], enc["attention_mask"]

    @staticmethod
    def _check_prompts(prompts) -> List[str]:
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        if not prompts:
            raise ValueError("prompts is empty; expected at least one prompt string")
        bad = [p for p in prompts if not isinstance(p, str)]
        if bad:
            raise TypeError(f"prompts must be strings; got {bad[0]!r} ({type(bad[0]).__name__})")
        return prompts

    @staticmethod
    def _check_max_len(max_sequence_length) -> int:
        if isinstance(max_sequence_length, bool) or not isinstance(max_sequence_length, int) \
                or max_sequence_length < 1:
            raise ValueError(f"max_sequence_length={max_sequence_length!r}; expected an int >= 1")
        return max_sequence_length

    # -- model ------------------------------------------------------------------------------
    def forward_layers(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None
                       ) -> List[torch.Tensor]:
        """Outputs [B, L, hidden] of the selected decoder layers (selection order); the
        forward stops right after the last selected layer."""
        captured = {}
        last = max(self.selected_layer_index)

        def capture(index):
            def hook(module, args, output):
                captured[index] = output[0] if isinstance(output, (tuple, list)) else output
                if index == last:
                    raise _StopAfterLastSelectedLayer
            return hook

        handles = [self._layers[i].register_forward_hook(capture(i)) for i in sorted(set(self.selected_layer_index))]
        device = self.device
        try:
            with torch.no_grad():
                self._base(input_ids=input_ids.to(device),
                           attention_mask=None if attention_mask is None else attention_mask.to(device),
                           use_cache=False)
        except _StopAfterLastSelectedLayer:
            pass
        finally:
            for h in handles:
                h.remove()
        if last not in captured:
            raise RuntimeError(f"the text encoder's forward never ran decoder layer {last}; expected "
                               f"{type(self._base).__name__} to call each of its {len(self._layers)} layers")
        return [captured[i] for i in self.selected_layer_index]

    def _encode_uncached(self, prompts: List[str], max_len: int, date: Optional[str], strict: bool):
        ids, attn = self._tokenize(prompts, max_len, date, strict)
        off = self.txt_offset
        if ids.shape[1] <= off:
            empty = torch.empty(len(prompts), 0, self.hidden_size, dtype=self.dtype, device=self.device)
            return [empty.clone() for _ in self.selected_layer_index], torch.zeros(len(prompts), 0, dtype=torch.bool)
        feats = self.forward_layers(ids, attn)
        return [f[:, off:] for f in feats], attn[:, off:].bool()

    def encode(self, prompts: Union[str, List[str]], max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH,
               device=None, dtype=None) -> Tuple[List[torch.Tensor], torch.Tensor]:
        """Lens text features of ``prompts``: (list of [B, S, hidden] per selected layer,
        mask [B, S] bool), moved to ``device`` / cast to ``dtype`` when given."""
        prompts = self._check_prompts(prompts)
        max_len = self._check_max_len(max_sequence_length)
        dtype = resolve_dtype(dtype)
        if self.cache_size == 0:
            feats, mask = self._encode_uncached(prompts, max_len, self.template_date, self._date_explicit)
        else:
            feats, mask = self._encode_cached(prompts, max_len)
        out_device = torch.device(device) if device is not None else self.device
        feats = [f.to(device=out_device, dtype=dtype or f.dtype) for f in feats]
        return feats, mask.to(out_device)

    # -- cache ------------------------------------------------------------------------------
    def _encode_cached(self, prompts: List[str], max_len: int):
        # Without a fixed date the key holds today's date, and the prompts are rendered with
        # that same date, so a batch straddling midnight cannot be stored under the wrong day.
        date = self._today()
        # (prompt, date, max length) plus what else shapes an entry, should it be changed
        extra = (tuple(self.selected_layer_index), self.txt_offset)
        keys = [(p, date, max_len) + extra for p in prompts]
        entries = {}
        for key in keys:
            if key not in entries and key in self._cache:
                self._cache.move_to_end(key)
                entries[key] = self._cache[key]
        hits = sum(1 for key in keys if key in entries)
        self._hits += hits
        self._misses += len(keys) - hits
        missing = list(dict.fromkeys(p for p, key in zip(prompts, keys) if key not in entries))
        if missing:
            feats, mask = self._encode_uncached(missing, max_len, date, self._date_explicit)
            for j, p in enumerate(missing):
                n = int(mask[j].sum())
                entry = tuple(f[j, :n].to(self.cache_device or f.device, copy=True) for f in feats)
                entries[(p, date, max_len) + extra] = entry
                self._cache[(p, date, max_len) + extra] = entry
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
        rows = [entries[key] for key in keys]
        seq = max(row[0].shape[0] for row in rows)
        ref = rows[0][0]
        feats = [torch.zeros(len(rows), seq, ref.shape[-1], dtype=ref.dtype, device=ref.device)
                 for _ in self.selected_layer_index]
        mask = torch.zeros(len(rows), seq, dtype=torch.bool, device=ref.device)
        for b, row in enumerate(rows):
            n = row[0].shape[0]
            mask[b, :n] = True
            for k, f in enumerate(row):
                feats[k][b, :n] = f.to(ref.device)
        return feats, mask

    def cache_info(self) -> dict:
        """{'hits', 'misses', 'size', 'maxsize'}: prompts served from / added to the cache."""
        return {"hits": self._hits, "misses": self._misses, "size": len(self._cache), "maxsize": self.cache_size}

    def clear_cache(self) -> None:
        self._cache.clear()
        self._hits = self._misses = 0
