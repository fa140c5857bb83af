"""compile_lm: a transformers decoder-only model as one refittable step over a static KV cache.

The step wraps the model without copying it: its children and parameters are the model's
own, so the program's weights carry the model's names (a state_dict refits it as is). The
KV cache is one buffer pair per attention layer, sized (max_batch_size, kv heads,
max_seq_len, head dim) by running the model once on one token; the model writes its new keys
and values into it through a small cache object (transformers' `Cache.update` protocol) and
attends to every slot under a mask built in the graph from the padding mask and the slots'
positions. The mask is handed to the model ready-made (4-D), which transformers passes
through unchanged, so no model code is patched.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator, Sequence
from numbers import Integral
from typing import Any

import torch
from torch.export import Dim

from .compile import compile_with_variants
from .errors import ExportError, SettingsError, UnsupportedGraphError
from .export import TRACING
from .lm import CompiledLM
from .module import LMInfo
from .settings import Settings

_CACHE = "torchrefit_kv_cache"  # the child holding the cache buffers (k0, v0, k1, ...)


def compile_lm(
    model: torch.nn.Module,
    max_batch_size: int,
    max_seq_len: int,
    *,
    decode_batch_sizes: Sequence[int] | None = None,
    settings: Settings | None = None,
    **overrides: Any,
) -> CompiledLM:
    """Compile a transformers causal LM (GPT-2, Llama, Qwen2, Mistral families) into a
    `CompiledLM`: prefill and decode over one static KV cache of `max_batch_size` rows and
    `max_seq_len` positions. The model is compiled in its own dtype and on its own device;
    `cuda_graphs` defaults to True there when that device is a GPU.

    `decode_batch_sizes`: batch sizes whose one-token decode step gets engines compiled for
    exactly that shape (on a GPU, batch-1 matrix-vector products become fused, tuned
    reductions); other batch sizes decode with the general engines. Default: (1,) on a GPU,
    none on a CPU (where it gains nothing). Each adds to the compile time."""
    _check_limits(max_batch_size, max_seq_len)
    _check_model(model)
    _check_positions(model, max_seq_len)
    device = _device_of(model)
    sizes = _decode_sizes(decode_batch_sizes, max_batch_size, device)
    if "cuda_graphs" not in overrides and settings is None:
        overrides["cuda_graphs"] = device.type == "cuda"
    settings = Settings.from_overrides(settings, **overrides)
    dtype = _dtype_of(model)
    if settings.dtype is not None and settings.dtype != str(dtype).removeprefix("torch."):
        raise SettingsError(
            f"compile_lm compiles in the model's dtype ({dtype}); Settings.dtype is "
            f"{settings.dtype}. Convert the model first (model.to(torch.{settings.dtype}))."
        )
    if settings.device is not None and torch.device(settings.device) != device:
        raise SettingsError(
            f"compile_lm compiles on the model's device ({device}); Settings.device is "
            f"{settings.device}. Move the model first (model.to({settings.device!r}))."
        )
    with TRACING, _grouped_attention(model):
        step = _Step(model, max_batch_size, max_seq_len, device, dtype)
        examples = _examples(max_seq_len, device)
        program = _export(step, examples, max_batch_size, max_seq_len)
    exact = [((), _decode_inputs(b, max_seq_len, device)) for b in sizes]
    compiled = compile_with_variants(program, (), examples, settings, exact)
    lm = CompiledLM(compiled, compiled.graph)  # the same engines, fallbacks and store
    lm._torchrefit = compiled._torchrefit
    lm._torchrefit.lm = _info(model, step, max_batch_size, max_seq_len)
    lm.bind(lm._torchrefit.store)
    return lm


# -- the step -----------------------------------------------------------------------------


class _CacheProtocol:
    """What transformers' models ask of a cache besides `update`. Not a transformers `Cache`
    subclass, on purpose: its mask helpers then take the 4-D mask given as is."""

    is_compileable = True

    def __init__(self, layers: int, max_cache_len: int) -> None:
        self.layers = layers
        self.max_cache_len = max_cache_len
        self.is_sliding = [False] * layers
        self.is_linear = [False] * layers
        self.is_dummy = [False] * layers

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0  # positions always come from position_ids

    def get_max_length(self) -> int:
        return self.max_cache_len

    def get_mask_sizes(self, *_: Any, **__: Any) -> tuple[int, int]:
        return self.max_cache_len, 0

    def __len__(self) -> int:
        return self.layers


class _Cache(_CacheProtocol):
    """`update` writes the new keys and values into their slots of the static buffers and
    returns the whole (batch rows of the) cache to attend over."""

    def __init__(self, holder: torch.nn.Module, layers: int, max_seq_len: int) -> None:
        super().__init__(layers, max_seq_len)
        self.holder = holder
        self.slots: torch.Tensor | None = None  # cache positions of the new tokens
        self.rows: torch.Tensor | None = None  # batch rows of the call
        self.batch = 0

    def update(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        layer_idx: int,
        *_: Any,
        **__: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.slots is not None and self.rows is not None
        keys = getattr(self.holder, f"k{layer_idx}")
        values = getattr(self.holder, f"v{layer_idx}")
        # one index_put on the whole buffer (rows x slots), not a write through a view of its
        # first rows: Inductor then updates the cache in place instead of copying all of it
        where = (self.rows[:, None], slice(None), self.slots[None, :])
        keys[where] = key_states.transpose(1, 2).to(keys.dtype)
        values[where] = value_states.transpose(1, 2).to(values.dtype)
        return keys[: self.batch], values[: self.batch]


class _Probe(_CacheProtocol):
    """A cache that records the key/value shape of each layer on a one-token run."""

    def __init__(self) -> None:
        super().__init__(0, 1)
        self.shapes: dict[int, tuple[tuple[int, ...], tuple[int, ...], torch.dtype]] = {}

    def update(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        layer_idx: int,
        *_: Any,
        **__: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self.shapes[layer_idx] = (
            tuple(key_states.shape),
            tuple(value_states.shape),
            key_states.dtype,
        )
        return key_states, value_states


class _Step(torch.nn.Module):
    """forward(input_ids, position_ids, cache_position, attention_mask, logits_index) ->
    logits at `logits_index`; writes the tokens' keys and values into the cache."""

    def __init__(
        self,
        model: torch.nn.Module,
        max_batch_size: int,
        max_seq_len: int,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        super().__init__()
        object.__setattr__(self, "lm", model)  # not a child: its children are ours below
        self._parameters = model._parameters  # one dict: the model's names, no copy
        self._buffers = model._buffers
        holder = torch.nn.Module()
        shapes = _probe(model, device, dtype)
        for i, (k, v, dtype) in sorted(shapes.items()):
            for name, shape in (("k", k), ("v", v)):
                full = (_rows(max_batch_size), shape[1], max_seq_len, shape[3])
                buffer = torch.zeros(full, dtype=dtype, device=device)
                holder.register_buffer(f"{name}{i}", buffer, persistent=False)
        if sorted(shapes) != list(range(len(shapes))):
            raise UnsupportedGraphError(
                f"{type(model).__name__} updates its cache at layers {sorted(shapes)}; "
                "compile_lm needs one cache layer per attention layer, numbered from 0."
            )
        self._modules = {**model._modules, _CACHE: holder}
        self.cache = _Cache(holder, len(shapes), max_seq_len)
        self.window = _sliding_window(model)
        self.dtype = dtype
        self.takes_logits_to_keep = "logits_to_keep" in inspect.signature(model.forward).parameters

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        cache_position: torch.Tensor,
        attention_mask: torch.Tensor,
        logits_index: torch.Tensor,
    ) -> torch.Tensor:
        self.cache.slots = cache_position
        self.cache.batch = input_ids.shape[0]
        self.cache.rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        mask = _mask(attention_mask, cache_position, self.dtype, self.window)
        kwargs = _model_call(self.__dict__["lm"], input_ids, position_ids, cache_position, mask,
                             self.cache)  # fmt: skip
        if self.takes_logits_to_keep:
            kwargs["logits_to_keep"] = logits_index
        logits = self.__dict__["lm"](**kwargs).logits
        return logits if self.takes_logits_to_keep else logits[:, logits_index]


def _model_call(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    position_ids: torch.Tensor,
    cache_position: torch.Tensor,
    mask: torch.Tensor,
    cache: Any,
) -> dict[str, Any]:
    """The keyword arguments of a cached call of `model`, named as its transformers version
    names them (`cache` or `past_key_values`; `cache_position` where it is taken)."""
    params = inspect.signature(model.forward).parameters
    kwargs: dict[str, Any] = {
        "input_ids": input_ids,
        "attention_mask": mask,
        "position_ids": position_ids,
        "cache" if "cache" in params else "past_key_values": cache,
        "use_cache": True,
    }
    if "cache_position" in params:
        kwargs["cache_position"] = cache_position
    return kwargs


_ATTENTION = "torchrefit_grouped"


@contextlib.contextmanager
def _grouped_attention(model: torch.nn.Module) -> Iterator[None]:
    """While tracing, the model's attention layers call `_attend` (transformers'
    AttentionInterface); the model is as it was afterwards."""
    from transformers import AttentionInterface

    AttentionInterface.register(_ATTENTION, _attend)
    config: Any = model.config
    before = config._attn_implementation
    config._attn_implementation = _ATTENTION
    try:
        yield
    finally:
        config._attn_implementation = before


def _attend(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    softcap: float | None = None,
    **_: Any,
) -> tuple[torch.Tensor, None]:
    """Attention over the whole cache with the query heads grouped by their key/value head:
    the cache is read once per step, never repeated per query head (what SDPA with a mask
    does under tracing). Scores and softmax in float32, as transformers' eager attention."""
    batch, heads, tokens, dim = query.shape
    kv_heads, slots = key.shape[1], key.shape[2]
    group = heads // kv_heads
    q = query.contiguous().reshape(batch, kv_heads, group * tokens, dim)  # heads h*group+g
    scale = scaling if scaling is not None else dim**-0.5
    scores = torch.matmul(q, key.transpose(2, 3)).float() * scale
    scores = scores.reshape(batch, kv_heads, group, tokens, slots)
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    if attention_mask is not None:
        scores = scores + attention_mask[:, :, None, :, :slots].float()
    probs = scores.softmax(dim=-1).to(value.dtype).reshape(batch, kv_heads, group * tokens, slots)
    out = torch.matmul(probs, value).unflatten(2, (group, tokens))  # (batch, kv, group, ...)
    return out.permute(0, 3, 1, 2, 4).reshape(batch, tokens, heads, dim), None


def _mask(
    padding: torch.Tensor, slots: torch.Tensor, dtype: torch.dtype, window: int | None
) -> torch.Tensor:
    """(batch, 1, new tokens, cache slots), additive: 0 where a token may attend (a slot at
    or before its own, not padding, within the sliding window), the dtype's minimum elsewhere
    (finite, so a padding row's softmax stays finite)."""
    kv = torch.arange(padding.shape[1], device=padding.device)
    allowed = kv[None, :] <= slots[:, None]
    if window is not None:
        allowed = allowed & (slots[:, None] - kv[None, :] < window)
    allowed = allowed[None, None, :, :] & (padding[:, None, None, :] != 0)
    zero = torch.zeros((), dtype=dtype, device=padding.device)
    low = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=padding.device)
    return torch.where(allowed, zero, low)


def _probe(
    model: torch.nn.Module, device: torch.device, dtype: torch.dtype
) -> dict[int, tuple[tuple[int, ...], tuple[int, ...], torch.dtype]]:
    """Key/value shapes per layer, from one token through the model."""
    probe = _Probe()
    ids = torch.zeros(1, 1, dtype=torch.long, device=device)
    mask = torch.zeros(1, 1, 1, 1, dtype=dtype, device=device)
    kwargs = _model_call(model, ids, ids, ids[0], mask, probe)
    try:
        with torch.no_grad():
            model(**kwargs)
    except Exception as exc:
        raise UnsupportedGraphError(
            f"{type(model).__name__} did not run with a static KV cache ({type(exc).__name__}: "
            f"{exc}). compile_lm supports transformers decoder-only LMs whose attention "
            "layers call cache.update (GPT-2, Llama, Qwen2, Mistral); compile other models "
            "with torchrefit.compile(model, ..., use_cache=False)."
        ) from exc
    if not probe.shapes:
        raise UnsupportedGraphError(
            f"{type(model).__name__} never wrote to the KV cache it was given; compile_lm "
            "needs a transformers decoder-only LM (GPT-2, Llama, Qwen2, Mistral families)."
        )
    for i, (k, v, _) in probe.shapes.items():
        if len(k) != 4 or len(v) != 4 or k[2] != 1:
            raise UnsupportedGraphError(
                f"Layer {i} of {type(model).__name__} caches keys of shape {list(k)}; "
                "compile_lm expects (batch, heads, tokens, head dim)."
            )
    return probe.shapes


def _examples(seq: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Example inputs whose dynamic sizes differ from each other and from their bounds
    (batch 2, 5 tokens, logits of 3; at least 3 rows and 8 positions): sizes that are equal
    in the example may be taken for one symbol when compiled, a bound for a constant."""
    batch, tokens, keep = 2, 5, 3
    ids = torch.zeros(batch, tokens, dtype=torch.long, device=device)
    slots = torch.arange(tokens, device=device)
    return {
        "input_ids": ids,
        "position_ids": slots[None].expand(batch, tokens).contiguous(),
        "cache_position": slots,
        "attention_mask": torch.ones(batch, seq, dtype=torch.long, device=device),
        "logits_index": torch.arange(tokens - keep, tokens, device=device),
    }


def _decode_inputs(batch: int, seq: int, device: torch.device) -> dict[str, torch.Tensor]:
    """The inputs of a one-token decode step of `batch` rows, laid out as generate makes them."""
    ids = torch.zeros(batch, 1, dtype=torch.long, device=device)
    one = torch.zeros(1, dtype=torch.long, device=device)
    return {
        "input_ids": ids,
        "position_ids": ids.clone(),
        "cache_position": one,
        "attention_mask": torch.ones(batch, seq, dtype=torch.long, device=device),
        "logits_index": one.clone(),
    }


def _decode_sizes(
    sizes: Sequence[int] | None, max_batch_size: int, device: torch.device
) -> tuple[int, ...]:
    if sizes is None:
        return (1,) if device.type == "cuda" else ()
    if isinstance(sizes, (str, bytes)) or not isinstance(sizes, Sequence):
        raise SettingsError(
            f"decode_batch_sizes is {sizes!r}; give a sequence of batch sizes, e.g. (1, 8)."
        )
    bad: list[Any] = [b for b in sizes if isinstance(b, bool) or not isinstance(b, Integral)]
    bad += [b for b in sizes if b not in bad and not 1 <= b <= max_batch_size]
    if bad:
        raise SettingsError(
            f"decode_batch_sizes holds {bad!r}; each must be an int from 1 to max_batch_size "
            f"({max_batch_size})."
        )
    return tuple(sorted({int(b) for b in sizes}))


def _export(
    step: _Step, examples: dict[str, torch.Tensor], max_batch_size: int, max_seq_len: int
) -> torch.export.ExportedProgram:
    # the batch stays dynamic even for one row (a static size 1 trips torch.export's guard
    # function when the program is decomposed): the cache holds at least three rows
    batch = Dim("batch", min=1, max=_rows(max_batch_size))
    tokens, keep = Dim("tokens", min=1, max=max_seq_len), Dim("keep", min=1, max=max_seq_len)
    dynamic = {
        "input_ids": {0: batch, 1: tokens},
        "position_ids": {0: batch, 1: tokens},
        "cache_position": {0: tokens},
        "attention_mask": {0: batch},
        "logits_index": {0: keep},
    }
    try:
        with torch.no_grad():
            return torch.export.export(step, (), examples, dynamic_shapes=dynamic, strict=False)
    except Exception as exc:
        raise ExportError(
            f"torch.export could not trace {type(step.lm).__name__} with a static KV cache "
            f"({type(exc).__name__}: {str(exc)[:400]}). compile_lm supports transformers "
            "decoder-only LMs (GPT-2, Llama, Qwen2, Mistral families)."
        ) from exc


# -- the model ----------------------------------------------------------------------------


def _rows(max_batch_size: int) -> int:
    """Cache rows: at least three, so that the example batch (2) is below the largest batch
    (an example at a Dim's bound may be specialized on when Inductor compiles)."""
    return max(3, max_batch_size)


def _check_limits(max_batch_size: Any, max_seq_len: Any) -> None:
    limits = (("max_batch_size", max_batch_size, 1), ("max_seq_len", max_seq_len, 8))
    for name, value, least in limits:
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise SettingsError(f"{name} is {value!r}; give an int of at least {least}.")


def _check_model(model: Any) -> None:
    config = getattr(model, "config", None)
    if not isinstance(model, torch.nn.Module) or config is None:
        raise UnsupportedGraphError(
            f"compile_lm takes a transformers causal LM (a PreTrainedModel with a config); got "
            f"{type(model).__name__}. Compile other modules with torchrefit.compile."
        )
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedGraphError(
            f"{type(model).__name__} is an encoder-decoder model; compile_lm compiles "
            "decoder-only LMs. Compile it with torchrefit.compile(model, ..., use_cache=False)."
        )
    if model.training:
        raise UnsupportedGraphError(
            f"{type(model).__name__} is in training mode (dropout would run in every step); "
            "call model.eval() before compile_lm."
        )
    types = getattr(config, "layer_types", None)
    if types and len(set(types)) > 1:
        raise UnsupportedGraphError(
            f"{type(model).__name__} mixes attention kinds per layer {sorted(set(types))}; "
            "compile_lm compiles models whose layers all attend alike."
        )


def _check_positions(model: torch.nn.Module, max_seq_len: int) -> None:
    """A model with a learned position table (GPT-2's `wpe`) has no embedding for positions
    beyond it; rotary models compute theirs and take any length."""
    config = model.config
    inputs = model.get_input_embeddings()  # type: ignore[operator]
    tables = {
        m.num_embeddings
        for m in model.modules()
        if isinstance(m, torch.nn.Embedding) and m is not inputs
    }
    for name in ("n_positions", "max_position_embeddings", "n_ctx"):
        limit = getattr(config, name, None)
        # a table of that many rows (OPT's holds two more: its positions start at 2)
        if isinstance(limit, int) and tables & {limit, limit + 2} and max_seq_len > limit:
            raise SettingsError(
                f"max_seq_len is {max_seq_len}; {type(model).__name__}'s position table holds "
                f"{limit} positions (config.{name}), and later positions have no embedding. "
                f"Give a max_seq_len of at most {limit}."
            )


def _sliding_window(model: torch.nn.Module) -> int | None:
    config = model.config
    types = getattr(config, "layer_types", None)
    window = getattr(config, "sliding_window", None)
    if types:
        return window if types[0] == "sliding_attention" else None
    if getattr(config, "use_sliding_window", True) is False:
        return None
    return window if isinstance(window, int) else None


def _device_of(model: torch.nn.Module) -> torch.device:
    devices = {p.device for p in model.parameters()}
    if len(devices) != 1:
        raise UnsupportedGraphError(
            f"{type(model).__name__}'s weights are on {sorted(map(str, devices))}; compile_lm "
            "compiles a model on one device. Move it with model.to(device)."
        )
    return devices.pop()


def _dtype_of(model: torch.nn.Module) -> torch.dtype:
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    return torch.float32 if not dtypes else max(dtypes, key=lambda d: torch.finfo(d).bits)


def _info(model: torch.nn.Module, step: _Step, batch: int, seq: int) -> LMInfo:
    config: Any = model.config
    # transformers' generate reads the generation config (made from the model config)
    source = getattr(model, "generation_config", None) or config
    eos = getattr(source, "eos_token_id", None)
    pad = getattr(source, "pad_token_id", None)
    vocab = model.get_output_embeddings().weight.shape[0]  # type: ignore[operator]
    keys = tuple(f"{_CACHE}.{n}{i}" for i in range(step.cache.layers) for n in ("k", "v"))
    return LMInfo(
        batch,
        seq,
        keys,
        int(vocab),
        () if eos is None else ((int(eos),) if isinstance(eos, int) else tuple(map(int, eos))),
        None if pad is None else int(pad),
    )


__all__ = ["compile_lm"]
