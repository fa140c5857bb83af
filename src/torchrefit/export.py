"""Model -> ExportedProgram, and a weight's identity: its FQN in the graph signature."""

from __future__ import annotations

import copy
import logging
import threading
from dataclasses import dataclass
from typing import Any

import torch
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind, OutputKind
from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode

from .errors import ExportError, SettingsError, UnsupportedGraphError
from .settings import Settings
from .tables import parse_dtype as parse_dtype  # a dtype read back by name: a table lookup

logger = logging.getLogger("torchrefit")

# torch.export, decompositions and Inductor share process-wide tracing state: two traces at
# once can swap a model's parameters for FakeTensors. Every trace torchrefit starts holds it.
TRACING = threading.RLock()

_KINDS = {
    InputKind.PARAMETER: "parameter",
    InputKind.BUFFER: "buffer",
    InputKind.CONSTANT_TENSOR: "constant",
}


@dataclass(frozen=True)
class WeightSpec:
    """One source weight of the compiled program, as the graph signature names it."""

    fqn: str
    kind: str  # "parameter", "buffer" or "constant"
    shape: tuple[int, ...]
    dtype: str
    persistent: bool  # False for non-persistent buffers and lifted constants

    def to_json(self) -> dict[str, Any]:
        return {
            "fqn": self.fqn,
            "kind": self.kind,
            "shape": list(self.shape),
            "dtype": self.dtype,
            "persistent": self.persistent,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> WeightSpec:
        return cls(
            data["fqn"], data["kind"], tuple(data["shape"]), data["dtype"], data["persistent"]
        )


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def export_model(
    model: torch.nn.Module | ExportedProgram,
    args: tuple[Any, ...],
    kwargs: dict[str, Any] | None,
) -> ExportedProgram:
    """The program as the user gave it: an ExportedProgram passes through."""
    if isinstance(model, ExportedProgram):
        return model
    if not isinstance(model, torch.nn.Module):
        raise ExportError(
            f"compile() got a {type(model).__name__}; expected an nn.Module or a "
            "torch.export.ExportedProgram."
        )
    if not isinstance(args, tuple):
        raise ExportError(
            f"arg_inputs is a {type(args).__name__}; expected a tuple of example inputs, "
            "e.g. (torch.randn(1, 3, 224, 224),)."
        )
    try:
        with TRACING, torch.no_grad():
            return torch.export.export(model, args, kwargs or {}, strict=False)
    except Exception as exc:
        raise ExportError(_export_failure(model, exc)) from exc


def _export_failure(model: torch.nn.Module, exc: Exception) -> str:
    """The export error in the user's terms, with the fix that works for its cause."""
    text = str(exc)
    name = type(model).__name__
    if "Cache" in text and "not a known type" in text:
        return (
            f"{name} returns a transformers cache object (use_cache=True is transformers' "
            "default), which a compiled engine cannot return. To generate with a KV cache, "
            "use torchrefit.compile_lm(model, max_batch_size, max_seq_len); to compile the "
            "forward alone, pass kwarg_inputs={'use_cache': False} (or set "
            "model.config.use_cache = False)."
        )
    if isinstance(_data_dependent_cause(exc), GuardOnDataDependentSymNode):
        return _data_dependent_failure(name, text)
    return (
        f"torch.export could not export {name}: {text}. Export it yourself "
        "(torch.export.export) and pass the ExportedProgram, or fix the model."
    )


def _data_dependent_cause(exc: BaseException) -> BaseException | None:
    while exc is not None and not isinstance(exc, GuardOnDataDependentSymNode):
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return exc


def _data_dependent_failure(name: str, text: str) -> str:
    """Python control flow on a tensor's value: the fixes that export (torch.cond, or a
    bounded .item() kept symbolic), which torchrefit then runs in PyTorch."""
    where = _user_frame(text)
    if "extract specialized integer" in text or "specialized float" in text:
        return (
            f"{name}'s forward turns a tensor's value into a Python number{where} (int() or "
            "float() of .item()), which torch.export cannot trace. "
            "Keep it symbolic: `n = t.item()` with its bounds stated, "
            "`torch._check(n >= 0); torch._check(n <= MAX)`, then use `n` in tensor ops "
            "(torch.arange(n), x[:n]); torchrefit runs the ops that depend on it in PyTorch."
        )
    return (
        f"{name}'s forward branches on a tensor's value{where or ' (`if x.sum() > 0:`)'}, which "
        "torch.export cannot trace. Write the branch as torch.cond(pred, true_fn, false_fn, "
        "(x,)) (both branches must return tensors of the same shapes); torchrefit runs it in "
        "PyTorch, with its weights refittable."
    )


def _user_frame(text: str) -> str:
    """' at File "...", line N: <code>' from torch's message, where it names the call."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.strip().startswith("File ") and i + 1 < len(lines):
            return f" at {line.strip()}: `{lines[i + 1].strip()}`"
    return ""


def engine_program(
    source: ExportedProgram,
    model: torch.nn.Module | ExportedProgram,
    args: tuple[Any, ...],
    kwargs: dict[str, Any] | None,
    settings: Settings,
) -> ExportedProgram:
    """The program engines are built from: the source, cast and moved when settings ask."""
    target_dtype, target_device = _conversion(source, args, kwargs, settings)
    if target_dtype is None and target_device is None:
        return source
    if isinstance(model, ExportedProgram):
        raise SettingsError(
            f"Settings dtype={settings.dtype!r} device={settings.device!r} differ from the "
            "ExportedProgram's weights or inputs. torchrefit converts nn.Modules only: pass "
            "the module, or export it already converted."
        )
    logger.info("converting a copy of the model to dtype=%s device=%s", target_dtype, target_device)
    converted = copy.deepcopy(model).to(device=target_device, dtype=target_dtype)
    cast = lambda t: convert_input(t, target_dtype, target_device)  # noqa: E731
    args = torch.utils._pytree.tree_map(cast, args)
    kwargs = torch.utils._pytree.tree_map(cast, kwargs or {})
    return export_model(converted, args, kwargs)


def convert_input(value: Any, dtype: torch.dtype | None, device: torch.device | None) -> Any:
    if not isinstance(value, torch.Tensor):
        return value
    if dtype is not None and value.is_floating_point():
        value = value.to(dtype)
    return value if device is None else value.to(device)


def _conversion(
    source: ExportedProgram, args: Any, kwargs: Any, settings: Settings
) -> tuple[torch.dtype | None, torch.device | None]:
    weights = list(source.state_dict.values()) + list(source.constants.values())
    tensors = [
        t for t in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)
    ]
    dtype = settings.torch_dtype
    floats = [t for t in weights + tensors if t.is_floating_point()]
    need_dtype = dtype is not None and any(t.dtype != dtype for t in floats)
    device = None if settings.device is None else torch.device(settings.device)
    if device is not None and device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    need_device = device is not None and any(t.device != device for t in weights + tensors)
    return (dtype if need_dtype else None), (device if need_device else None)


def weight_specs(ep: ExportedProgram) -> dict[str, WeightSpec]:
    """Placeholder name -> WeightSpec for every weight input of the program."""
    placeholders = [n for n in ep.graph.nodes if n.op == "placeholder"]
    specs: dict[str, WeightSpec] = {}
    for node, spec in zip(placeholders, ep.graph_signature.input_specs, strict=True):
        if spec.kind not in _KINDS:
            if spec.kind != InputKind.USER_INPUT:
                raise UnsupportedGraphError(
                    f"Input {node.name!r} is of kind {spec.kind.name}, which torchrefit does "
                    "not compile (token or custom object); remove it from the model."
                )
            continue
        val = node.meta["val"]
        persistent = spec.kind == InputKind.PARAMETER or (
            spec.kind == InputKind.BUFFER and bool(spec.persistent)
        )
        specs[node.name] = WeightSpec(
            spec.target, _KINDS[spec.kind], tuple(val.shape), dtype_name(val.dtype), persistent
        )
    return specs


@dataclass(frozen=True)
class Mutation:
    """One state write of the forward, as eager PyTorch does it: a buffer ("buffer", its
    FQN) or a user input ("input", its placeholder name) takes the value of one output."""

    kind: str
    target: str

    def to_json(self) -> list[str]:
        return [self.kind, self.target]


_MUTATIONS = {OutputKind.BUFFER_MUTATION: "buffer", OutputKind.USER_INPUT_MUTATION: "input"}


def mutations(ep: ExportedProgram) -> list[Mutation]:
    """The state writes of a decomposed program, in output order (they come first).

    A forward may update its buffers (a running counter, a static cache) and its inputs in
    place; anything else that writes state is refused here, at compile time, with the fix."""
    found: list[Mutation] = []
    for spec in ep.graph_signature.output_specs:
        if spec.kind == OutputKind.USER_OUTPUT:
            continue
        if spec.kind not in _MUTATIONS or spec.target is None:
            raise UnsupportedGraphError(
                f"The exported forward writes {spec.target!r} ({spec.kind.name}), which "
                "torchrefit does not compile (a parameter or a gradient). Remove the in-place "
                "update, or call model.eval() before compiling."
            )
        found.append(Mutation(_MUTATIONS[spec.kind], str(spec.target)))
    _refuse_training_batch_norm(ep, found)
    _refuse_training_dropout(ep)
    return found


# dropouts as a decomposed program holds them: (op, index of `p`, index of `train`)
_DROPOUTS = (
    (torch.ops.aten.native_dropout.default, 1, 2),
    (torch.ops.aten.dropout.default, 1, 2),
    (torch.ops.aten.feature_dropout.default, 1, 2),
    (torch.ops.aten.alpha_dropout.default, 1, 2),
    (torch.ops.aten.feature_alpha_dropout.default, 1, 2),
)


def _refuse_training_dropout(ep: ExportedProgram) -> None:
    """A dropout in training mode draws new random masks in every call: the model was
    exported in training mode (transformers models built from a config start in it)."""
    for node in ep.graph.nodes:
        for op, p_at, train_at in _DROPOUTS:
            if node.target is not op or len(node.args) <= train_at:
                continue
            if node.args[train_at] is not False and node.args[p_at] != 0:
                where = node.meta.get("nn_module_stack", {})
                module = next(reversed(where.values()))[0] if where else node.name
                raise UnsupportedGraphError(
                    f"Dropout {module!r} runs in training mode (p={node.args[p_at]}): every "
                    "call would zero random activations, which inference engines do not do, "
                    "and two calls would disagree. The model is in training mode "
                    "(transformers models built from a config start so): call model.eval() "
                    "before compiling."
                )


def _refuse_training_batch_norm(ep: ExportedProgram, found: list[Mutation]) -> None:
    for node in ep.graph.nodes:
        if (
            node.target is torch.ops.aten._native_batch_norm_legit_functional.default
            and node.args[5]
        ):
            buffers = [m.target for m in found if m.kind == "buffer"]
            raise UnsupportedGraphError(
                f"Batch norm {node.name!r} runs in training mode: every call would update its "
                f"running statistics (buffers {buffers[:4]}) from the batch, which inference "
                "engines do not do. Call model.eval() before compiling."
            )


def source_tensors(ep: ExportedProgram) -> dict[str, torch.Tensor]:
    """FQN -> tensor for every weight of the program (parameters, buffers, constants)."""
    tensors = dict(ep.state_dict)
    tensors.update({k: v for k, v in ep.constants.items() if isinstance(v, torch.Tensor)})
    return tensors


def tied_aliases(ep: ExportedProgram, fqns: list[str]) -> dict[str, str]:
    """Name -> canonical FQN for names that share one tensor (tied weights), in any order.

    The canonical FQN is the first of its group in signature order; the state_dict may
    hold further names for it that the signature does not list.
    """
    tensors = source_tensors(ep)
    canonical: dict[int, str] = {}
    for fqn in fqns:
        canonical.setdefault(id(tensors[fqn]), fqn)
    return {
        name: canonical[id(t)]
        for name, t in tensors.items()
        if id(t) in canonical and canonical[id(t)] != name
    }
