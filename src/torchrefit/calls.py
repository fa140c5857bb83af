"""Calls as users write them: the forward's signature, and a call bound to the compiled layout.

torch.export fixes one layout of the inputs, `((args...), {kwargs...})` as the example call
gave them. Users call the compiled module as they call the model: an argument by keyword
that was an example positionally, an optional argument left out because its default is the
value traced. `bind` maps such a call onto the layout, as Python binds a call to `forward`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch.utils._pytree as pytree
from torch.export import ExportedProgram

from .errors import InputError

_KINDS = {
    inspect.Parameter.POSITIONAL_ONLY: "positional_only",
    inspect.Parameter.POSITIONAL_OR_KEYWORD: "positional_or_keyword",
    inspect.Parameter.VAR_POSITIONAL: "var_positional",
    inspect.Parameter.KEYWORD_ONLY: "keyword_only",
    inspect.Parameter.VAR_KEYWORD: "var_keyword",
}
_POSITIONAL = ("positional_only", "positional_or_keyword")
_DATA = (type(None), bool, int, float, str)  # defaults recorded as JSON


class _Unrecorded:
    """The default of a parameter whose default is not data (a tensor, an object)."""

    def __repr__(self) -> str:
        return "<default>"


UNRECORDED = _Unrecorded()


@dataclass(frozen=True)
class Parameter:
    name: str
    kind: str  # a value of _KINDS
    has_default: bool = False
    default: Any = UNRECORDED  # the default when it is data; UNRECORDED otherwise

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"name": self.name, "kind": self.kind}
        if self.has_default:
            data["has_default"] = True
            if self.default is not UNRECORDED:
                data["default"] = self.default
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Parameter:
        if data["kind"] not in _KINDS.values() or not isinstance(data["name"], str):
            raise ValueError(f"bad parameter {data!r}")
        default = data.get("default", UNRECORDED)
        if default is not UNRECORDED and not isinstance(default, _DATA):
            raise ValueError(f"bad default {default!r}")
        return cls(data["name"], data["kind"], bool(data.get("has_default", False)), default)


@dataclass(frozen=True)
class CallSignature:
    """The forward's parameters: names, kinds, and the defaults that are data."""

    parameters: tuple[Parameter, ...]

    def to_json(self) -> list[dict[str, Any]]:
        return [p.to_json() for p in self.parameters]

    @classmethod
    def from_json(cls, data: list[dict[str, Any]]) -> CallSignature:
        return cls(tuple(Parameter.from_json(p) for p in data))

    def python(self) -> inspect.Signature:
        kinds = {v: k for k, v in _KINDS.items()}
        return inspect.Signature(
            [
                inspect.Parameter(
                    p.name,
                    kinds[p.kind],
                    default=p.default if p.has_default else inspect.Parameter.empty,
                )
                for p in self.parameters
            ]
        )

    def __str__(self) -> str:
        return f"forward{self.python()}"


def signature_of(forward: Callable[..., Any]) -> CallSignature | None:
    """`forward`'s signature; None when Python cannot tell it (a builtin)."""
    try:
        parameters = inspect.signature(forward).parameters.values()
    except (TypeError, ValueError):
        return None
    return CallSignature(tuple(_parameter(p) for p in parameters))


def _parameter(p: inspect.Parameter) -> Parameter:
    if p.default is inspect.Parameter.empty:
        return Parameter(p.name, _KINDS[p.kind])
    default = p.default if type(p.default) in _DATA else UNRECORDED
    return Parameter(p.name, _KINDS[p.kind], True, default)


def signature_of_layout(in_spec: pytree.TreeSpec, names: list[str] | None) -> CallSignature:
    """What an ExportedProgram tells of its call: the names of its example arguments
    (torch.export's forward_arg_names; positions when unknown), each required."""
    count, keys = layout(in_spec)
    names = list(names or [])
    if len(names) != count + len(keys) or len(set(names)) != len(names):
        names = [f"arg{i}" for i in range(count)] + keys
        kind = "positional_only"
    else:
        kind = "positional_or_keyword"
    positional = [Parameter(n, kind) for n in names[:count]]
    return CallSignature(tuple(positional + [Parameter(k, "keyword_only") for k in keys]))


def program_signature(program: ExportedProgram) -> CallSignature:
    """The signature an ExportedProgram records: the names torch.export gave its example
    arguments (positional, then keyword)."""
    entries = program.module_call_graph
    recorded = entries[0].signature if entries else None
    return signature_of_layout(
        program.call_spec.in_spec, getattr(recorded, "forward_arg_names", None)
    )


def layout(in_spec: pytree.TreeSpec) -> tuple[int, list[str]]:
    """How many positional arguments the compiled call takes, and its keyword names."""
    args, kwargs = in_spec.children()
    return args.num_children, list(kwargs.context or [])


def bind(
    signature: CallSignature, in_spec: pytree.TreeSpec, args: tuple[Any, ...], kwargs: dict
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The call `(args, kwargs)` in the compiled layout, or an InputError in the user's terms."""
    count, keys = layout(in_spec)
    if len(args) == count and len(kwargs) == len(keys) and kwargs.keys() == set(keys):
        return args, {k: kwargs[k] for k in keys}  # the call as compiled: nothing to bind
    try:
        given = signature.python().bind(*args, **kwargs).arguments
    except TypeError as exc:
        raise InputError(
            f"The call does not fit {signature}: {exc}. Call the compiled module as you "
            "call the model."
        ) from None
    binding = _Binding(signature, given)
    positional = tuple(binding.positional(i, count) for i in range(count))
    named = {k: binding.keyword(k) for k in keys}
    binding.check_rest(count, keys)
    return positional, named


class _Binding:
    """One bound call, read slot by slot; what the layout does not take must be a default."""

    def __init__(self, signature: CallSignature, given: dict[str, Any]) -> None:
        self.signature = signature
        self.given = given
        self.params = {p.name: p for p in signature.parameters}
        self.positional_params = [p for p in signature.parameters if p.kind in _POSITIONAL]
        self.var_positional = _of_kind(signature, "var_positional")
        self.var_keyword = _of_kind(signature, "var_keyword")
        self.used: set[str] = set()

    def positional(self, i: int, count: int) -> Any:
        if i < len(self.positional_params):
            return self._value(self.positional_params[i])
        extra = self.given.get(self.var_positional.name, ()) if self.var_positional else ()
        j = i - len(self.positional_params)
        if j >= len(extra):
            raise InputError(
                f"The module was compiled for {count} positional arguments "
                f"({self.var_positional and '*' + self.var_positional.name}); this call gives "
                f"{len(self.positional_params) + len(extra)}. Pass the same number as the "
                "example inputs (compile again for another)."
            )
        return extra[j]

    def keyword(self, key: str) -> Any:
        p = self.params.get(key)
        if p is not None and p.kind not in ("var_positional", "var_keyword"):
            return self._value(p)
        extra = self.given.get(self.var_keyword.name, {}) if self.var_keyword else {}
        if key not in extra:
            raise InputError(
                f"Argument {key!r} is missing; the module was compiled with it (a keyword "
                f"argument of {self.signature}). Pass {key}=..."
            )
        return extra[key]

    def check_rest(self, count: int, keys: list[str]) -> None:
        """Every argument the compiled layout does not take must equal its traced default."""
        for name, value in self.given.items():
            p = self.params[name]
            if name in self.used:
                continue
            if p.kind == "var_positional":
                taken = max(count - len(self.positional_params), 0)
                if len(value) > taken:
                    raise InputError(
                        f"This call passes {len(self.positional_params) + len(value)} "
                        f"positional arguments; the module was compiled for {count}. Compile "
                        "again with the extra arguments in the example inputs."
                    )
            elif p.kind == "var_keyword":
                extra = sorted(set(value) - set(keys))
                if extra:
                    raise _not_compiled(extra[0], value[extra[0]], None)
            elif not (p.default is not UNRECORDED and _same(value, p.default)):
                raise _not_compiled(name, value, p)

    def _value(self, p: Parameter) -> Any:
        self.used.add(p.name)
        if p.name in self.given:
            return self.given[p.name]
        if p.default is not UNRECORDED:
            return p.default  # left out, as the default it was compiled with
        raise InputError(
            f"Argument {p.name!r} is missing; the module was compiled with it ({self.signature}). "
            f"Pass {p.name}."
        )


def _of_kind(signature: CallSignature, kind: str) -> Parameter | None:
    return next((p for p in signature.parameters if p.kind == kind), None)


def _same(value: Any, default: Any) -> bool:
    return type(value) is type(default) and value == default


def _not_compiled(name: str, value: Any, p: Parameter | None) -> InputError:
    traced = (
        f"so its default {p.default!r} is what the program computes with"
        if p is not None and p.default is not UNRECORDED
        else "so its default is what the program computes with"
    )
    shown = f"a tensor of shape {list(value.shape)}" if hasattr(value, "shape") else repr(value)
    return InputError(
        f"Argument {name!r} was not in the example inputs the module was compiled with, {traced}; "
        f"this call gives {shown}. Compile with {name} in the example inputs to pass it."
    )


def argument_names(signature: CallSignature, in_spec: pytree.TreeSpec) -> list[str]:
    """The name of each argument of the compiled layout: positional ones, then keywords."""
    count, keys = layout(in_spec)
    positional = [p.name for p in signature.parameters if p.kind in _POSITIONAL]
    var = _of_kind(signature, "var_positional")
    rest = var.name if var is not None else "args"
    names = [
        positional[i] if i < len(positional) else f"{rest}[{i - len(positional)}]"
        for i in range(count)
    ]
    return names + keys


def leaf_names(signature: CallSignature, in_spec: pytree.TreeSpec) -> list[str]:
    """A name per flat input, in the user's terms: `input_ids`, `inputs['mask']`, `args[2]`."""
    names: list[str] = []
    for name, child in zip(argument_names(signature, in_spec), _arguments(in_spec), strict=True):
        names.extend(name + suffix for suffix in _suffixes(child))
    return names


def _arguments(in_spec: pytree.TreeSpec) -> list[pytree.TreeSpec]:
    args, kwargs = in_spec.children()
    return args.children() + kwargs.children()


def _suffixes(spec: pytree.TreeSpec) -> list[str]:
    tree = pytree.tree_unflatten(list(range(spec.num_leaves)), spec)
    return [pytree.keystr(path) for path, _ in pytree.tree_flatten_with_path(tree)[0]]


def structure_error(
    signature: CallSignature, in_spec: pytree.TreeSpec, args: tuple[Any, ...], kwargs: dict
) -> InputError:
    """The argument whose nesting (tuple, list, dict keys) differs from the compiled one."""
    values = list(args) + list(kwargs.values())
    names = argument_names(signature, in_spec)
    for name, value, spec in zip(names, values, _arguments(in_spec), strict=True):
        got = pytree.tree_flatten(value)[1]
        if got != spec:
            return InputError(
                f"Argument {name!r} is {_describe(got)}; the module was compiled for "
                f"{_describe(spec)}. Pass it structured as the example input was."
            )
    return InputError(f"The call's inputs are not structured as compiled ({signature}).")


def _describe(spec: pytree.TreeSpec) -> str:
    if spec.is_leaf():
        return "one value (a tensor or a number)"
    if spec.type is dict:
        return f"a dict with keys {list(spec.context)}"
    return f"a {getattr(spec.type, '__name__', spec.type)} of {spec.num_children}"
