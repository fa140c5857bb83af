"""One frozen settings object for compile and refit."""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import SettingsError

_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
BACKENDS = ("inductor", "eager")
QUANTIZE = (None, "fp8", "int8")


def _affects_engine(default: Any, doc: str, **kwargs: Any) -> Any:
    """A field whose value changes what an engine computes: it feeds the fingerprint."""
    return field(default=default, metadata={"engine": True, "doc": doc}, **kwargs)


def _runtime(default: Any, doc: str, **kwargs: Any) -> Any:
    return field(default=default, metadata={"engine": False, "doc": doc}, **kwargs)


@dataclass(frozen=True)
class Settings:
    """How `torchrefit.compile` builds engines. Variants come from `dataclasses.replace`."""

    immutable_weights: bool = _affects_engine(
        False, "Refuse every refit; the engine may fold weights freely."
    )
    min_block_size: int = _affects_engine(
        1, "Fewest compute ops in an engine partition; smaller runs stay in PyTorch."
    )
    torch_executed_ops: frozenset[str] = _affects_engine(
        frozenset(),
        'Ops that stay in PyTorch, by name ("torch.ops.aten.convolution.default") or overload.',
    )
    device: str | None = _affects_engine(
        None, "Device of engine weights and compute; default: where the example inputs are."
    )
    dtype: str | None = _affects_engine(
        None,
        "float32, float16 or bfloat16 for engine weights and compute; default: the model's.",
    )
    backend: str = _affects_engine(
        "inductor", '"inductor" (generated kernels) or "eager" (PyTorch; for debugging).'
    )
    fold_batch_norm: bool = _affects_engine(
        False,
        "Fold inference batch norm into the preceding convolution (a weight program): a few "
        "% faster inference, slower refits (docs/benchmarks.md).",
    )
    inductor_options: tuple[tuple[str, Any], ...] = _affects_engine(
        (), "Extra Inductor options, as (name, value) pairs."
    )
    quantize: str | None = _affects_engine(
        None,
        '"fp8" or "int8": the weights of linear layers are stored quantized, one float32 '
        "scale per output channel, and re-quantized from full precision on every refit; "
        "None: every constant in the engine dtype.",
    )
    cache_dir: str | None = _runtime(
        None,
        "Engine cache directory: a structure compiled before is loaded and refitted, not compiled.",
    )
    cache_max_bytes: int = _runtime(
        4 << 30, "Size bound of the engine cache; least recently used entries go."
    )
    double_buffer: bool = _runtime(
        False,
        "Keep a standby copy of the weights: refits write and check it while calls run, then "
        "flip (twice the weight memory).",
    )
    cuda_graphs: bool = _runtime(
        False,
        "Replay each input shape's call as a CUDA graph (inputs copied in, outputs copied out).",
    )
    check_finite: bool = _runtime(
        True,
        "Refuse a refit whose new values hold NaN (or inf where the compiled constant held "
        "none) before anything is written; False copies without looking (every door).",
    )
    staging_bytes: int = _runtime(
        512 << 20,
        "Bound of the device staging area host and file sources go through (read once, "
        "checked there, then copied on the device); larger sources go in chunks, read twice.",
    )

    def __post_init__(self) -> None:
        """Every field checked and normalized here, before any compile: a wrong value is a
        SettingsError naming the field, the value and what is expected."""
        if not isinstance(self.backend, str) or self.backend not in BACKENDS:
            raise SettingsError(
                f"Settings.backend is {self.backend!r}; expected one of {BACKENDS}."
            )
        object.__setattr__(self, "dtype", _dtype_name(self.dtype))
        if self.dtype is not None and self.dtype not in _DTYPES:
            raise SettingsError(
                f"Settings.dtype is {self.dtype!r}; expected one of {sorted(_DTYPES)}, the "
                "torch dtype itself, or None."
            )
        if _not_int(self.min_block_size) or self.min_block_size < 1:
            raise SettingsError(
                f"Settings.min_block_size is {self.min_block_size!r}; expected an int >= 1."
            )
        object.__setattr__(self, "torch_executed_ops", _op_names(self.torch_executed_ops))
        object.__setattr__(self, "inductor_options", _options(self.inductor_options))
        if self.backend == "inductor" and self.inductor_options:
            _check_inductor_names(self.inductor_options)
        object.__setattr__(self, "device", _device_name(self.device))
        if self.cache_dir is not None:
            if not isinstance(self.cache_dir, (str, os.PathLike)):
                raise SettingsError(
                    f"Settings.cache_dir is {self.cache_dir!r}; expected a path or None."
                )
            object.__setattr__(self, "cache_dir", os.fspath(self.cache_dir))
        if self.quantize not in QUANTIZE:
            raise SettingsError(
                f"Settings.quantize is {self.quantize!r}; expected one of {QUANTIZE}."
            )
        for name in (
            "immutable_weights",
            "fold_batch_norm",
            "cuda_graphs",
            "double_buffer",
            "check_finite",
        ):
            if not isinstance(getattr(self, name), bool):
                raise SettingsError(
                    f"Settings.{name} is {getattr(self, name)!r}; expected True or False."
                )
        if _not_int(self.staging_bytes) or self.staging_bytes < 1 << 20:
            raise SettingsError(
                f"Settings.staging_bytes is {self.staging_bytes!r}; expected an int of at least "
                f"{1 << 20} (bytes)."
            )
        if _not_int(self.cache_max_bytes) or self.cache_max_bytes <= 0:
            raise SettingsError(
                f"Settings.cache_max_bytes is {self.cache_max_bytes!r}; expected a positive int "
                "(bytes)."
            )

    @property
    def torch_dtype(self) -> torch.dtype | None:
        return None if self.dtype is None else _DTYPES[self.dtype]

    @classmethod
    def from_overrides(cls, base: Settings | None = None, **overrides: Any) -> Settings:
        """`base` with keyword overrides, each checked against the fields."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise SettingsError(f"Unknown setting(s) {unknown}; the settings are {sorted(names)}.")
        return dataclasses.replace(base or cls(), **overrides)

    def engine_key(self) -> dict[str, Any]:
        """The fields that change what an engine computes, as JSON-able values."""
        return {
            f.name: _jsonable(getattr(self, f.name))
            for f in dataclasses.fields(self)
            if f.metadata.get("engine")
        }

    def to_json(self) -> dict[str, Any]:
        return {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Settings:
        data = dict(data)
        data["torch_executed_ops"] = frozenset(data.get("torch_executed_ops", ()))
        data["inductor_options"] = tuple(tuple(p) for p in data.get("inductor_options", ()))
        return cls.from_overrides(**data)


def _device_name(device: Any) -> str | None:
    """A device as its string ("cuda:0"); torch.device accepted. Checked here, not after a
    whole compile."""
    if device is None:
        return None
    if not isinstance(device, (str, torch.device)):
        raise SettingsError(
            f"Settings.device is {device!r}; expected a string such as 'cuda:0', a "
            "torch.device or None."
        )
    try:
        return str(torch.device(device))
    except (RuntimeError, ValueError) as exc:
        raise SettingsError(
            f"Settings.device is {device!r}, which is no device ({exc}); e.g. 'cpu' or 'cuda:0'."
        ) from exc


def _not_int(value: Any) -> bool:
    return isinstance(value, bool) or not isinstance(value, int)


def _options(options: Any) -> tuple[tuple[str, Any], ...]:
    """(name, value) pairs, sorted; each value JSON data, as the fingerprint records it."""
    try:
        pairs = dict(options)
    except (TypeError, ValueError) as exc:
        raise SettingsError(
            f"Settings.inductor_options is {options!r}; expected (name, value) pairs or a dict."
        ) from exc
    bad = [k for k in pairs if not isinstance(k, str)]
    if bad:
        raise SettingsError(
            f"Settings.inductor_options names {bad[:3]}; expected option names as strings, e.g. "
            '("max_autotune", True).'
        )
    for name, value in pairs.items():
        try:
            json.dumps(value)
        except (TypeError, ValueError) as exc:
            raise SettingsError(
                f"Settings.inductor_options[{name!r}] is {value!r}; expected a JSON value "
                "(a bool, number, string, list or dict), which the fingerprint records."
            ) from exc
    for name, value in pairs.items():
        _refuse_command_line(name, value)
    return tuple(sorted((k, _frozen(v)) for k, v in pairs.items()))


# Inductor options whose string values reach a compiler's command line
_COMPILER_OPTIONS = ("cpp.", "cuda.", "triton.", "rocm.", "aot_inductor.")


def _refuse_command_line(name: str, value: Any) -> None:
    """A compiler option's value is one plain token: with spaces or a leading "-" it would
    add arguments to the compiler's command line (gcc's `-wrapper` runs any program)."""
    if not name.startswith(_COMPILER_OPTIONS):
        return
    strings = value if isinstance(value, (list, tuple)) else [value]
    for text in strings:
        if isinstance(text, str) and (text.startswith("-") or any(c.isspace() for c in text)):
            raise SettingsError(
                f"Settings.inductor_options[{name!r}] is {value!r}; a value with spaces or a "
                "leading '-' would add arguments to a compiler's command line. Give one plain "
                "token (e.g. 'native')."
            )


def _frozen(value: Any) -> Any:
    """A list option value as a tuple: settings stay hashable."""
    return tuple(_frozen(v) for v in value) if isinstance(value, list) else value


def _check_inductor_names(options: tuple[tuple[str, Any], ...]) -> None:
    # Inductor's config takes 2 s to import: only for those who set its options
    config = importlib.import_module("torch._inductor.config")
    unknown = [name for name, _ in options if not hasattr(config, name)]
    if unknown:
        raise SettingsError(
            f"Settings.inductor_options names {unknown}, which torch._inductor.config does not "
            "have; expected option names of torch._inductor.config, e.g. 'max_autotune'."
        )


def _dtype_name(dtype: Any) -> str | None:
    if dtype is None:
        return None
    if isinstance(dtype, str):
        return dtype.removeprefix("torch.")
    for name, value in _DTYPES.items():
        if value == dtype:
            return name
    raise SettingsError(
        f"Settings.dtype is {dtype!r}; expected one of {sorted(_DTYPES)}, the torch dtype "
        "itself, or None."
    )


def _op_names(ops: Any) -> frozenset[str]:
    if isinstance(ops, (str, torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        ops = [ops]
    if not isinstance(ops, (list, tuple, set, frozenset)):
        raise SettingsError(
            f"Settings.torch_executed_ops is {ops!r}; expected a set of op names such as "
            '{"torch.ops.aten.convolution.default"} or op overloads.'
        )
    names = set()
    for op in ops:
        name = (op if isinstance(op, str) else _overload_name(op)).removeprefix("torch.ops.")
        if not _resolves(name):
            raise SettingsError(
                f"Settings.torch_executed_ops names {name!r}, which is no op; expected a name "
                'such as "torch.ops.aten.convolution.default" or "aten.convolution".'
            )
        names.add(name)
    return frozenset(names)


def _resolves(name: str) -> bool:
    parts = name.split(".")
    if len(parts) not in (2, 3):
        return False
    try:
        packet = getattr(getattr(torch.ops, parts[0]), parts[1])
        return len(parts) == 2 or hasattr(packet, parts[2])
    except (AttributeError, RuntimeError):
        return False


def _overload_name(op: Any) -> str:
    if isinstance(op, torch._ops.OpOverload):
        return str(op)
    if isinstance(op, torch._ops.OpOverloadPacket):
        return f"{op._qualified_op_name.replace('::', '.')}"
    raise SettingsError(
        f"Settings.torch_executed_ops holds {op!r}; expected an op name such as "
        '"torch.ops.aten.convolution.default" or an op overload.'
    )


def _jsonable(value: Any) -> Any:
    if isinstance(value, frozenset):
        return sorted(value)
    if isinstance(value, tuple):
        return [list(v) if isinstance(v, tuple) else v for v in value]
    return value


def settings_table() -> str:
    """The README's settings table, from the fields themselves."""
    rows = ["| setting | default | changes the engine | what |", "|---|---|---|---|"]
    for f in dataclasses.fields(Settings):
        default = _jsonable(f.default)
        rows.append(
            f"| `{f.name}` | `{default!r}` | {'yes' if f.metadata['engine'] else 'no'} "
            f"| {f.metadata['doc']} |"
        )
    return "\n".join(rows)
