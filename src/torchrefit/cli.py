"""The torchrefit command: inspect a file, refit it with new weights, compile a model.

Exit codes: 0 on success, 1 on a torchrefit error (message on stderr), 2 on bad usage.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from typing import Any, TextIO

import torch
import torch.utils._pytree as pytree

from .api import load, save
from .compile import compile as compile_model
from .errors import RefitVerificationError, SerializationError, TorchRefitError
from .module import CompiledModule, InputGuard
from .refit import refit_module_weights
from .refit.evaluate import evaluate
from .refit.files import read_tensor
from .refit.match import fast
from .refit.read import read
from .refit.verify import compare_outputs
from .serialize import MALFORMED, open_file
from .settings import Settings


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except TorchRefitError as exc:
        print(f"torchrefit: error: {_one_line(str(exc))}", file=sys.stderr)
        return 1
    except Exception as exc:  # noqa: BLE001 - one line, never a traceback (TORCHREFIT_DEBUG=1 shows it)
        if os.environ.get("TORCHREFIT_DEBUG") == "1":
            raise
        print(
            f"torchrefit: error: {type(exc).__name__}: {_one_line(str(exc))} "
            "(TORCHREFIT_DEBUG=1 shows the traceback)",
            file=sys.stderr,
        )
        return 1
    return 0


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="torchrefit", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    inspect = commands.add_parser(
        "inspect", help="engines, constants, settings and fingerprint of a file (reads no code)"
    )
    inspect.add_argument("file", help="a file written by torchrefit.save")
    inspect.add_argument("--json", action="store_true", help="print the summary as JSON")
    inspect.set_defaults(run=_inspect)

    refit = commands.add_parser(
        "refit", help="refit a saved module with new weights, save the result"
    )
    refit.add_argument(
        "file", help="a file written by torchrefit.save (its engines are loaded: trust it)"
    )
    refit.add_argument("weights", help="a safetensors file of the new weights")
    refit.add_argument("-o", "--output", required=True, help="where to write the refitted module")
    refit.add_argument(
        "--strip-prefix", default="", help='drop this prefix from weight names (e.g. "model.")'
    )
    refit.add_argument(
        "--verify",
        action="store_true",
        help="after the refit, check every engine constant against the checkpoint (read again, "
        "casts and weight programs evaluated anew), and write the output only if, loaded "
        "again, it computes what the refitted module does on random inputs. Not an eager "
        "comparison: the file holds no model code (verify_output=True in Python is one)",
    )
    refit.set_defaults(run=_refit)

    compile_ = commands.add_parser(
        "compile", help="compile a model made by MODULE:FACTORY for random inputs of given shapes"
    )
    compile_.add_argument("model", help='"package.module:factory"; factory() returns an nn.Module')
    compile_.add_argument(
        "--input",
        action="append",
        required=True,
        metavar="SHAPE[:DTYPE]",
        help='one per positional input, e.g. "8,3,224,224" or "8,128:int64" (default float32)',
    )
    compile_.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a Settings field, e.g. backend=eager, dtype=float16, min_block_size=3",
    )
    compile_.add_argument("--device", default=None, help="where the inputs live (default cpu)")
    compile_.add_argument("-o", "--output", required=True)
    compile_.add_argument(
        "--no-weights", action="store_true", help="save without weights (a small file)"
    )
    compile_.set_defaults(run=_compile)
    return parser


# -- inspect --------------------------------------------------------------------------------


def _inspect(args: argparse.Namespace) -> None:
    summary = inspect_file(args.file)
    if args.json:
        print(json.dumps(summary, indent=1))
        return
    print(
        f"{args.file}: torchrefit format {summary['version']}, "
        f"saved with torch {summary['torch_version']}"
    )
    print(f"fingerprint {summary['fingerprint']}")
    print("settings: " + ", ".join(f"{k}={v}" for k, v in summary["settings"].items()))
    for child in summary["children"]:
        extra = (
            f", {child['artifact_bytes']} bytes, sha256 {child['sha256'][:16]}..."
            if "sha256" in child
            else ""
        )
        print(f"{child['kind']} {child['name']}: {child['constants']} constants{extra}")
    print(
        f"{len(summary['constants'])} constants, {summary['weight_bytes']} bytes"
        f"{' (weights stripped)' if summary['stripped'] else ''}:"
    )
    for c in summary["constants"]:
        mark = " [stripped]" if c["stripped"] else ""
        note = f" ({c['note']})" if c["note"] else ""
        print(
            f"  {c['name']}  {c['dtype']}{c['shape']}  {c['bytes']} bytes  {c['lineage']}{note}"
            f"{mark}"
        )


def inspect_file(path: str) -> dict[str, Any]:
    """What a file holds, from its JSON metadata alone: no engine is loaded, nothing runs."""
    try:
        return _summary(path)
    except SerializationError:
        raise
    except MALFORMED as exc:
        raise SerializationError(
            f"{path!r} is malformed ({type(exc).__name__}: {str(exc)[:200]})."
        ) from exc


def _summary(path: str) -> dict[str, Any]:
    archive, metadata = open_file(path)
    with archive:
        sizes = {i.filename: i.file_size for i in archive.infolist()}
    state, stripped = metadata["state"], set(metadata.get("stripped", []))
    constants = []
    for name, spec in state["store"].items():
        nbytes = torch.empty((), dtype=getattr(torch, spec["dtype"])).element_size()
        for d in spec["shape"]:
            nbytes *= d
        constants.append(
            {
                "name": name,
                "dtype": spec["dtype"],
                "shape": spec["shape"],
                "bytes": nbytes,
                "lineage": state["lineage"][name]["kind"],
                "note": state["lineage"][name].get("note", ""),
                "stripped": name in stripped,
            }
        )
    children = []
    for child in metadata["children"]:
        entry = {
            "name": child["name"],
            "kind": child["kind"],
            "constants": len(child["constant_keys"]),
        }
        if child["kind"] == "engine":
            entry["sha256"] = child["sha256"]
            entry["artifact_bytes"] = sizes.get(f"engines/{child['name']}.bin", 0)
        children.append(entry)
    return {
        "version": metadata["version"],
        "torch_version": metadata["torch_version"],
        "fingerprint": state["fingerprint"],
        "settings": state["settings"],
        "children": children,
        "constants": constants,
        "weight_bytes": sum(c["bytes"] for c in constants),
        "stripped": bool(stripped),
    }


# -- refit ----------------------------------------------------------------------------------


def _refit(args: argparse.Namespace) -> None:
    started = time.perf_counter()
    name_map = (lambda n: n.removeprefix(args.strip_prefix)) if args.strip_prefix else None
    with _progress() as status:
        status.stage(f"loading engines from {args.file} ({_size(args.file)})")
        module = load(args.file)
        status.stage(f"refitting from {args.weights} ({_size(args.weights)})")
        refit_module_weights(module, args.weights, in_place=True, name_map=name_map)
        report = None
        if args.verify:
            status.stage(f"checking every constant against {args.weights}")
            counts = _check_weights(module, args.weights, name_map)
            status.stage(f"saving {args.output} and running it against the refitted module")
            difference = _save_checked(module, args.output)
            report = _verify_report(module, args.weights, args.output, counts, difference)
        else:
            status.stage(f"saving {args.output}")
            save(module, args.output)
    print(
        f"refitted {args.file} with {args.weights} -> {args.output} ({_size(args.output)}) "
        f"in {time.perf_counter() - started:.1f} s"
    )
    if report is not None:
        print(report)


def _check_weights(module: CompiledModule, path: str, name_map: Any) -> dict[str, int]:
    """Every engine constant equals what the checkpoint determines: read again from the file
    and evaluated anew (casts, weight programs), compared with the engines' buffers."""
    state = module._torchrefit
    values = evaluate(fast(read(path, state.specs, name_map), state), state)
    expected = dict(values.tensors)
    expected.update({k: read_tensor(t) for k, t in values.streamed.items()})
    for key, value in expected.items():
        held = state.store[key]
        if not torch.equal(held.cpu(), value.to(held.dtype).cpu()):
            raise RefitVerificationError(
                f"After the refit, engine constant {key!r} differs from what {path!r} gives "
                "it. The output was not written; this is a torchrefit bug: please report it."
            )
    kinds = [state.lineage[k].kind for k in expected]
    return {kind: kinds.count(kind) for kind in sorted(set(kinds))}


def _save_checked(module: CompiledModule, output: str) -> float:
    """Save to a temporary file beside `output`, load it as a user would, run both on random
    inputs shaped as the compiled example; only a file that computes the same becomes
    `output`. Returns the largest output difference."""
    directory = os.path.dirname(os.path.abspath(output))
    fd, scratch = tempfile.mkstemp(dir=directory, prefix=".torchrefit-", suffix=".trf")
    os.close(fd)
    try:
        save(module, scratch)
        reloaded = load(scratch)
        args, kwargs = _sample_inputs(module)
        with torch.no_grad():
            expected = module.run_program(*_cloned(args), **_cloned(kwargs))
            got = reloaded.run_program(*_cloned(args), **_cloned(kwargs))
        error = compare_outputs(got, expected)
        if error is not None:
            raise RefitVerificationError(
                f"{output!r}, loaded again, does not compute what the refitted module does: "
                f"{error.replace('eager', 'the refitted module')}. The output was not written."
            )
        os.replace(scratch, output)
    finally:
        if os.path.exists(scratch):
            os.remove(scratch)
    return _largest_difference(got, expected)


def _sample_inputs(module: CompiledModule) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Random inputs of the compiled dtypes and shapes (a dynamic dimension at the example's
    size); integer inputs are 0 or 1, valid token ids and indices for any model."""
    state = module._torchrefit
    flat = [_sample(g) for g in state.guards]
    args, kwargs = pytree.tree_unflatten(flat, state.in_spec)
    return tuple(args), dict(kwargs)


def _sample(guard: InputGuard) -> Any:
    if guard.dtype is None:
        return guard.value
    shape = guard.example_size()
    if guard.dtype.is_floating_point or guard.dtype.is_complex:
        return torch.randn(shape, dtype=guard.dtype, device=guard.device)
    return torch.randint(0, 2, shape, device=guard.device).to(guard.dtype)


def _cloned(tree: Any) -> Any:
    """A copy per run: a forward that writes its inputs must not feed the other run."""
    return pytree.tree_map(lambda x: x.clone() if isinstance(x, torch.Tensor) else x, tree)


def _largest_difference(got: Any, expected: Any) -> float:
    pairs = zip(pytree.tree_leaves(got), pytree.tree_leaves(expected), strict=True)
    return max(
        (
            (a.double() - e.double()).abs().max().item()
            for a, e in pairs
            if isinstance(a, torch.Tensor) and a.numel() and not a.is_complex()
        ),
        default=0.0,
    )


def _verify_report(
    module: CompiledModule, weights: str, output: str, counts: dict[str, int], difference: float
) -> str:
    kinds = ", ".join(f"{n} {kind}" for kind, n in counts.items())
    inputs = ", ".join(
        f"{name} {_input_text(g)}"
        for name, g in zip(module._torchrefit.input_names(), module._torchrefit.guards, strict=True)
    )
    return (
        f"verified: all {sum(counts.values())} engine constants equal what {weights} gives "
        f"them ({kinds}); {output}, loaded again, computes what the refitted module does on "
        f"random inputs ({inputs or 'none'}; largest difference {difference:.3g}). Not checked: "
        "agreement with the model's own forward, since the file holds no model code; in "
        "Python, refit_module_weights(compiled, model, arg_inputs=..., verify_output=True) "
        "compares with eager PyTorch."
    )


def _input_text(guard: InputGuard) -> str:
    if guard.dtype is None:
        return repr(guard.value)
    return f"{str(guard.dtype).removeprefix('torch.')}{guard.example_size()}"


def _size(path: str) -> str:
    try:
        size = os.path.getsize(path)
    except OSError:
        return "size unknown"
    return f"{size / 1e6:.1f} MB" if size >= 1e5 else f"{size} bytes"


# -- progress on a terminal -------------------------------------------------------------------


class _Status(logging.Handler):
    """One status line on stderr: the command's stage, elapsed time, engines built of the
    total (from torchrefit's log records) and the latest record. Warnings are printed above
    it, on lines of their own."""

    def __init__(self, stream: TextIO | None) -> None:
        super().__init__(logging.DEBUG)
        self.stream = stream  # None: silent (stderr is not a terminal)
        self.started = time.perf_counter()
        self.current = ""
        self.detail = ""
        self.engines: list[int] = [0, 0]  # built, total

    def stage(self, text: str) -> None:
        self.current, self.detail, self.engines = text, "", [0, 0]
        self._draw()

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if record.levelno >= logging.WARNING:
            self.above(f"torchrefit: {record.levelname.lower()}: {message}")
            return
        counts = record.args if isinstance(record.args, tuple) else ()
        if str(record.msg).startswith("partitioned into") and counts:
            self.engines = [0, counts[0] if isinstance(counts[0], int) else 0]
        elif str(record.msg).startswith("built "):
            self.engines[0] += 1
        self.detail = message
        self._draw()

    def above(self, text: str) -> None:
        if self.stream is None:
            return
        self.stream.write(f"\r\033[K{text}\n")
        self._draw()

    def clear(self) -> None:
        if self.stream is not None:
            self.stream.write("\r\033[K")
            self.stream.flush()

    def _draw(self) -> None:
        if self.stream is None:
            return
        built, total = self.engines
        engines = f", engines {built}/{total}" if total else ""
        line = f"[{time.perf_counter() - self.started:5.1f} s] {self.current}{engines}"
        if self.detail:
            line += f": {self.detail}"
        width = shutil.get_terminal_size((100, 20)).columns - 1
        self.stream.write(f"\r\033[K{line[:width]}")
        self.stream.flush()


@contextlib.contextmanager
def _progress() -> Iterator[_Status]:
    """Progress while a command runs, on stderr when it is a terminal; the line is cleared
    when the command ends, so that results and errors print on a clean line."""
    stream = sys.stderr if sys.stderr.isatty() else None
    status = _Status(stream)
    if stream is None:
        yield status
        return
    logger = logging.getLogger("torchrefit")
    level, shown = logger.level, warnings.showwarning
    logger.addHandler(status)
    logger.setLevel(logging.DEBUG)
    warnings.showwarning = lambda message, category, *_: status.above(
        f"{category.__name__}: {message}"
    )
    try:
        yield status
    finally:
        warnings.showwarning = shown
        logger.removeHandler(status)
        logger.setLevel(level)
        status.clear()


# -- compile --------------------------------------------------------------------------------


def _compile(args: argparse.Namespace) -> None:
    settings = Settings.from_overrides(**dict(_setting(item) for item in args.set))
    inputs = tuple(_example(spec, args.device or "cpu") for spec in args.input)
    started = time.perf_counter()
    with _progress() as status:
        status.stage(f"importing {args.model}")
        model = _factory(args.model)()
        if not isinstance(model, torch.nn.Module):
            raise TorchRefitError(
                f"{args.model} returned a {type(model).__name__}; expected an nn.Module."
            )
        status.stage(f"compiling {args.model}")
        compiled = compile_model(model.eval(), inputs, settings=settings)
        status.stage(f"saving {args.output}")
        save(compiled, args.output, include_weights=not args.no_weights)
    print(
        f"compiled {args.model} into {len(compiled.engines())} engine(s) -> {args.output} "
        f"({_size(args.output)}) in {time.perf_counter() - started:.1f} s"
    )


def _factory(spec: str) -> Any:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise TorchRefitError(f"MODEL is {spec!r}; expected 'package.module:factory'.")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())  # as `python -m` does: the current directory's packages
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise TorchRefitError(f"Cannot import {spec!r}: {exc}.") from exc


def _example(spec: str, device: str) -> torch.Tensor:
    shape_text, _, dtype_text = spec.partition(":")
    try:
        shape = [int(d) for d in shape_text.split(",")]
    except ValueError as exc:
        raise TorchRefitError(
            f"--input {spec!r}: expected comma-separated sizes, e.g. 8,3,224,224."
        ) from exc
    dtype = getattr(torch, dtype_text or "float32", None)
    if not isinstance(dtype, torch.dtype):
        raise TorchRefitError(f"--input {spec!r}: unknown dtype {dtype_text!r}.")
    if dtype.is_floating_point:
        return torch.randn(shape, dtype=dtype, device=device)
    return torch.randint(0, 2, shape, dtype=dtype, device=device)


def _setting(item: str) -> tuple[str, Any]:
    name, sep, text = item.partition("=")
    if not sep:
        raise TorchRefitError(f"--set {item!r}: expected NAME=VALUE.")
    try:
        value: Any = json.loads(text)
    except ValueError:
        value = text
    if name == "torch_executed_ops":
        value = frozenset(value if isinstance(value, list) else [value])
    return name, value


if __name__ == "__main__":
    sys.exit(main())
