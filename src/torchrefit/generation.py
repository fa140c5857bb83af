"""What a `CompiledLM.generate` call asks for, checked; and how each new token is chosen.

`resolve` turns generate's keyword arguments, over a transformers `GenerationConfig` whose
set fields are defaults the arguments override, into one frozen `Generation`. It refuses,
before any work, every value generate could not honour as asked: a wrong type (a bool is not
a count, a string not a generator), a value out of range, an argument generate does not
take, a config field set to a value that would change the result. `Chooser` picks each
step's tokens as transformers' logits processors do, in their order: repetition penalty,
the EOS ban of `min_new_tokens`, then temperature, top-k and top-p and a draw (or the
argmax); with the log-probability of each chosen token under the raw logits on request.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Any, TypedDict

import torch

from .errors import InputError


class GenerateKwargs(TypedDict, total=False):
    """The keywords `CompiledLM.generate` takes besides input_ids, attention_mask and
    max_new_tokens (None: unset, the generation_config's value or the default applies)."""

    max_length: int
    min_new_tokens: int
    min_length: int
    do_sample: bool
    temperature: float
    top_k: int
    top_p: float
    repetition_penalty: float
    num_return_sequences: int
    eos_token_id: int | Sequence[int]
    pad_token_id: int
    generator: torch.Generator
    generation_config: Any  # a transformers GenerationConfig
    return_logprobs: bool


KEYWORDS = frozenset(GenerateKwargs.__annotations__)
_PENALTY = "a positive number (1.0: no penalty)"
DEFAULT_NEW_TOKENS = 20  # when neither the call nor a generation_config bounds the length

# GenerationConfig fields generate implements, read as defaults for the arguments
_CONFIG_FIELDS = (
    "max_new_tokens", "max_length", "min_new_tokens", "min_length", "do_sample", "temperature",
    "top_k", "top_p", "repetition_penalty", "num_return_sequences", "eos_token_id",
    "pad_token_id",
)  # fmt: skip
# GenerationConfig fields that never change which tokens come out (how to cache, what to
# start an encoder-decoder with, bookkeeping)
_NEUTRAL_FIELDS = frozenset({
    "bos_token_id", "decoder_start_token_id", "use_cache", "cache_implementation",
    "cache_config", "compile_config", "disable_compile", "max_cache_len", "prefill_chunk_size",
    "transformers_version", "_from_model_config", "_commit_hash", "_original_object_hash",
})  # fmt: skip


@dataclass(frozen=True)
class Generation:
    """One generate call's settings, checked: what the decoding loop reads."""

    max_new_tokens: int
    min_new_tokens: int  # EOS is refused before this many new tokens
    do_sample: bool
    temperature: float
    top_k: int  # 0: off
    top_p: float  # 1.0: off
    repetition_penalty: float  # 1.0: off
    num_return_sequences: int
    eos: tuple[int, ...]  # empty: rows never end before max_new_tokens
    pad: int  # what a row that ended continues with
    generator: torch.Generator | None
    return_logprobs: bool


def unsupported(options: Mapping[str, Any]) -> list[str]:
    """What generate cannot honour: keywords it does not take, and generation_config fields
    set to values that would change the result (`num_beams=2`, ...)."""
    unknown = sorted(set(options) - KEYWORDS)
    config = options.get("generation_config")
    return unknown + (_config_unsupported(config) if config is not None else [])


def resolve(
    options: Mapping[str, Any],
    max_new_tokens: Any,
    prompt_length: int,
    vocab: int,
    model_eos: tuple[int, ...],
    model_pad: int | None,
    device: torch.device,
) -> Generation:
    """The checked settings of a call whose prompt holds `prompt_length` columns; `model_*`:
    the defaults from the model's generation config."""
    values = _merged(options)
    new, least = _lengths(values, options, max_new_tokens, prompt_length)
    do_sample = _flag("do_sample", values.get("do_sample", False))
    eos = _eos(values.get("eos_token_id"), model_eos, vocab)
    count = _count("num_return_sequences", values.get("num_return_sequences", 1), 1)
    if count > 1 and not do_sample:
        raise InputError(
            f"num_return_sequences={count} with greedy decoding would repeat one completion "
            f"{count} times (transformers refuses it too): pass do_sample=True."
        )
    return Generation(
        max_new_tokens=new,
        min_new_tokens=least,
        do_sample=do_sample,
        temperature=_temperature(values.get("temperature", 1.0), do_sample),
        top_k=_count("top_k", values.get("top_k", 0), 0),
        top_p=_real("top_p", values.get("top_p", 1.0), 0.0, 1.0, "a number in (0, 1]"),
        repetition_penalty=_real(
            "repetition_penalty", values.get("repetition_penalty", 1.0), 0.0, math.inf, _PENALTY
        ),
        num_return_sequences=count,
        eos=eos,
        pad=_pad(values.get("pad_token_id"), model_pad, eos, vocab),
        generator=_generator(values.get("generator"), do_sample, device),
        return_logprobs=_flag("return_logprobs", values.get("return_logprobs", False)),
    )


def sizes(
    options: Mapping[str, Any], max_new_tokens: Any, prompt_length: int, default: int
) -> tuple[int, int]:
    """(rows per prompt, new tokens) of a call, checked: what its KV cache must hold;
    `default`: the new tokens of a call that bounds neither."""
    values = _merged(options)
    new, _ = _lengths(values, options, max_new_tokens, prompt_length, default)
    return _count("num_return_sequences", values.get("num_return_sequences", 1), 1), new


# -- the arguments ------------------------------------------------------------------------


def _merged(options: Mapping[str, Any]) -> dict[str, Any]:
    """The generation_config's set fields, overridden by the arguments given (not None)."""
    unknown = sorted(set(options) - KEYWORDS)
    if unknown:
        raise InputError(
            f"CompiledLM.generate does not take {', '.join(unknown)}. It takes input_ids, "
            f"attention_mask, max_new_tokens and {', '.join(sorted(KEYWORDS))}. For other "
            "decoding (beam search, streamers, logits processors) run the model's own "
            "generate (MutableModule.generate does so for options it cannot compile)."
        )
    config = options.get("generation_config")
    values = {} if config is None else _config_values(config)
    values.update((k, v) for k, v in options.items() if v is not None)
    return values


def _config_values(config: Any) -> dict[str, Any]:
    bad = _config_unsupported(config)
    if bad:
        raise InputError(
            f"generation_config sets {', '.join(bad)}, which CompiledLM.generate does not "
            f"implement; leaving it out would change the result. It implements "
            f"{', '.join(_CONFIG_FIELDS)}: unset the others (or use the model's own generate)."
        )
    found = {name: getattr(config, name, None) for name in _CONFIG_FIELDS}
    return {name: value for name, value in found.items() if value is not None}


def _config_unsupported(config: Any) -> list[str]:
    """Fields of a GenerationConfig set to something else than a default generate matches."""
    from transformers import GenerationConfig  # optional dependency: only a config brings it

    if not isinstance(config, GenerationConfig):
        return [f"generation_config ({type(config).__name__}, not a GenerationConfig)"]
    fresh = vars(type(config)())  # transformers 5 leaves every field None, 4 its defaults
    defaults = getattr(type(config), "_get_default_generation_params", None)
    usual = defaults() if callable(defaults) else {}
    return [
        f"{name}={value!r}"
        for name, value in sorted(vars(config).items())
        if name not in _CONFIG_FIELDS
        and name not in _NEUTRAL_FIELDS
        and value is not None
        and not _same(value, fresh.get(name))
        and not (name in usual and _same(value, usual[name]))
    ]


def _same(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except Exception:  # a value whose == is not a bool (a tensor): not a default
        return False


def _lengths(
    values: dict[str, Any],
    options: Mapping[str, Any],
    max_new_tokens: Any,
    prompt: int,
    default: int = DEFAULT_NEW_TOKENS,
) -> tuple[int, int]:
    """(max_new_tokens, min_new_tokens): an explicit count wins over an explicit total
    length, which wins over the config's (its max_new_tokens, then its max_length)."""
    config = options.get("generation_config")
    total = _count("max_length", values["max_length"], 1) if "max_length" in values else None
    if max_new_tokens is not None:
        new = _count("max_new_tokens", max_new_tokens, 1)
    elif total is not None and (
        options.get("max_length") is not None or getattr(config, "max_new_tokens", None) is None
    ):
        new = total - prompt
        if new < 1:
            raise InputError(
                f"max_length={total} leaves no new token after a prompt of {prompt} columns; "
                "give a larger max_length, or max_new_tokens."
            )
    else:
        new = _count("max_new_tokens", values.get("max_new_tokens", default), 1)
    least = _count("min_new_tokens", values.get("min_new_tokens", 0), 0)
    total_least = _count("min_length", values.get("min_length", 0), 0)
    return new, max(least, total_least - prompt)  # both hold, as in transformers


def _count(name: str, value: Any, least: int) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral) or value < least:
        why = " (a bool is not a count)" if isinstance(value, bool) else ""
        raise InputError(f"{name} is {_shown(value)}{why}; give an int of at least {least}.")
    return int(value)


def _real(
    name: str, value: Any, low: float, high: float, wanted: str, *, zero: bool = False
) -> float:
    """A finite real in (low, high] (or [low, high] with `zero`)."""
    real = isinstance(value, Real) and not isinstance(value, bool)
    number = float(value) if real else math.nan
    above = low < number or (zero and low == number)
    if not (math.isfinite(number) and above and number <= high):
        raise InputError(f"{name} is {_shown(value)}; give {wanted}.")
    return number


def _flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise InputError(f"{name} is {_shown(value)}; give True or False.")
    return value


def _temperature(value: Any, do_sample: bool) -> float:
    if do_sample:
        return _real("temperature", value, 0.0, math.inf, "a positive number when sampling")
    # greedy decoding ignores it (a config's temperature=0.0 is common): its type still counts
    return _real("temperature", value, 0.0, math.inf, "a number of at least 0", zero=True)


def _token(name: str, value: Any, vocab: int) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral) or not 0 <= int(value) < vocab:
        raise InputError(
            f"{name} holds {_shown(value)}; give token ids in the vocabulary [0, {vocab})."
        )
    return int(value)


def _eos(value: Any, model_eos: tuple[int, ...], vocab: int) -> tuple[int, ...]:
    if value is None:
        return model_eos
    if isinstance(value, torch.Tensor):
        if value.is_floating_point() or value.is_complex() or value.dim() > 1:
            raise InputError(
                f"eos_token_id is {_shown(value)}; give an int, a list of ints or a 0-d/1-d "
                "integer tensor."
            )
        value = value.tolist()
    ids = value if isinstance(value, (list, tuple)) else [value]
    return tuple(_token("eos_token_id", t, vocab) for t in ids)


def _pad(value: Any, model_pad: int | None, eos: tuple[int, ...], vocab: int) -> int:
    if value is not None:
        return _token("pad_token_id", value, vocab)
    if model_pad is not None and eos:  # only a row that ended uses it
        if not 0 <= model_pad < vocab:
            raise InputError(
                f"The model's generation config has pad_token_id={model_pad}, outside the "
                f"vocabulary [0, {vocab}); pass pad_token_id= (a token id rows continue with "
                "once they ended)."
            )
        return model_pad
    return eos[0] if eos else 0  # as transformers does: finished rows repeat EOS


def _generator(value: Any, do_sample: bool, device: torch.device) -> torch.Generator | None:
    if value is None:
        return None
    if not isinstance(value, torch.Generator):
        raise InputError(
            f"generator is {_shown(value)}; give a torch.Generator (e.g. "
            f"torch.Generator({str(device)!r}).manual_seed(0)), or None."
        )
    if do_sample and torch.device(value.device).type != device.type:
        raise InputError(
            f"generator is on {value.device}, input_ids on {device}; make the generator "
            f"there: torch.Generator({str(device)!r})."
        )
    return value


def _shown(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"a tensor of {x.dtype}{list(x.shape)}"
    return f"{type(x).__name__} {x!r}"[:80]


# -- choosing tokens ----------------------------------------------------------------------


class Chooser:
    """Each step's token (and its log-probability) for every row. `rows`, an index of the
    rows still generating, confines the work to them (the others get `pad` and 0)."""

    def __init__(self, g: Generation, ids: torch.Tensor, mask: torch.Tensor | None, vocab: int):
        self.g = g
        self.eos = torch.tensor(g.eos, device=ids.device) if g.eos else None
        self.seen = _seen(ids, mask, vocab) if g.repetition_penalty != 1.0 else None
        # an argmax over all rows costs what gathering the live ones would
        self.compacts = g.do_sample or g.return_logprobs or self.seen is not None

    def __call__(
        self, logits: torch.Tensor, step: int, rows: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        raw = logits.float()
        batch = raw.shape[0]
        if rows is not None and self.compacts:
            raw = raw.index_select(0, rows)
        else:
            rows = None
        scores = self._processed(raw, step, rows)
        chosen = self._sample(scores) if self.g.do_sample else scores.argmax(dim=-1)
        logprobs = None
        if self.g.return_logprobs:
            picked = raw.gather(1, chosen[:, None]).squeeze(1)
            logprobs = picked - raw.logsumexp(dim=-1)
        if rows is not None:
            chosen = chosen.new_full((batch,), self.g.pad).index_copy_(0, rows, chosen)
            if logprobs is not None:
                logprobs = logprobs.new_zeros(batch).index_copy_(0, rows, logprobs)
        return chosen, logprobs

    def saw(self, tokens: torch.Tensor) -> None:
        """Remember the step's tokens for the repetition penalty."""
        if self.seen is not None:
            self.seen.scatter_(1, tokens[:, None], True)

    def _processed(
        self, scores: torch.Tensor, step: int, rows: torch.Tensor | None
    ) -> torch.Tensor:
        """The processors before sampling, out of place (the raw scores give logprobs)."""
        penalty = self.g.repetition_penalty
        if self.seen is not None:
            seen = self.seen if rows is None else self.seen.index_select(0, rows)
            penalized = torch.where(scores < 0, scores * penalty, scores / penalty)
            scores = torch.where(seen, penalized, scores)
        if self.eos is not None and step < self.g.min_new_tokens:
            scores = scores.index_fill(1, self.eos, float("-inf"))
        return scores

    def _sample(self, scores: torch.Tensor) -> torch.Tensor:
        """Temperature, then top-k, then top-p (nucleus), as transformers' warpers apply
        them, then a draw from the softmax."""
        g = self.g
        if g.temperature != 1.0:
            scores = scores / g.temperature
        if 0 < g.top_k < scores.shape[-1]:
            kth = torch.topk(scores, g.top_k, dim=-1).values[:, -1:]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if g.top_p < 1.0:
            ordered, order = torch.sort(scores, descending=False, dim=-1)
            cumulative = ordered.softmax(dim=-1).cumsum(dim=-1)
            drop = cumulative <= (1 - g.top_p)
            drop[:, -1] = False  # the most likely token always stays
            scores = scores.masked_fill(drop.scatter(1, order, drop), float("-inf"))
        probs = scores.softmax(dim=-1)
        return torch.multinomial(probs, 1, generator=g.generator).squeeze(1)


def _seen(ids: torch.Tensor, mask: torch.Tensor | None, vocab: int) -> torch.Tensor:
    """(rows, vocab): the tokens each row holds from its first real one on (transformers
    leaves a left padding out of the repetition penalty, and counts the rest)."""
    counted = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.cumsum(-1) > 0
    seen = torch.zeros(ids.shape[0], vocab + 1, dtype=torch.bool, device=ids.device)
    seen.scatter_(1, torch.where(counted, ids, vocab), True)
    return seen[:, :vocab].contiguous()


__all__ = ["Chooser", "GenerateKwargs", "Generation", "resolve", "sizes", "unsupported"]
