"""The torchrefit command: inspect a file, refit it with new weights, compile a model.

Exit codes: 0 on success, 1 on a torchrefit error (message on stderr), 2 on bad usage.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
from typing import Any

import torch

from .api import load, save
from .compile import compile as compile_model
from .errors import SerializationError, TorchRefitError
from .refit import refit_module_weights
from .refit.files import index_safetensors, read_tensor
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
        "--verify", action="store_true", help="compare with the weights' own values after the refit"
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
        print(f"  {c['name']}  {c['dtype']}{c['shape']}  {c['bytes']} bytes  {c['lineage']}{mark}")


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
    _progress("loading engines", 0.0)
    module = load(args.file)
    _progress("reading and copying weights", 0.33)
    name_map = (lambda n: n.removeprefix(args.strip_prefix)) if args.strip_prefix else None
    refit_module_weights(module, args.weights, in_place=True, name_map=name_map)
    if args.verify:
        _check_against_file(module, args.weights, name_map)
    _progress("saving", 0.66)
    save(module, args.output)
    _progress("done", 1.0)
    print(
        f"\nrefitted {args.file} with {args.weights} -> {args.output} "
        f"in {time.perf_counter() - started:.1f} s"
    )


def _check_against_file(module: Any, path: str, name_map: Any) -> None:
    state = module._torchrefit
    for name, entry in index_safetensors(path).items():
        key = name_map(name) if name_map else name
        key = state.aliases.get(key, key)
        if key in state.store.tensors and not torch.equal(
            state.store[key].cpu(), read_tensor(entry).to(state.store[key].dtype)
        ):
            raise TorchRefitError(f"After the refit, constant {key!r} differs from {path!r}.")


def _progress(stage: str, fraction: float) -> None:
    width = 30
    filled = int(width * fraction)
    print(
        f"\r[{'#' * filled}{' ' * (width - filled)}] {int(100 * fraction):3d}% {stage:<32}",
        end="",
        file=sys.stderr,
        flush=True,
    )


# -- compile --------------------------------------------------------------------------------


def _compile(args: argparse.Namespace) -> None:
    model = _factory(args.model)()
    if not isinstance(model, torch.nn.Module):
        raise TorchRefitError(
            f"{args.model} returned a {type(model).__name__}; expected an nn.Module."
        )
    inputs = tuple(_example(spec, args.device or "cpu") for spec in args.input)
    overrides = dict(_setting(item) for item in args.set)
    settings = Settings.from_overrides(**overrides)
    compiled = compile_model(model.eval(), inputs, settings=settings)
    save(compiled, args.output, include_weights=not args.no_weights)
    print(f"compiled {args.model} into {len(compiled.engines())} engine(s) -> {args.output}")


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
