"""`torchrefit inspect` (a file's metadata, no code run) and `torchrefit refit` (new weights
into a saved module, optionally verified before the output is written)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import time
from typing import Any, TextIO

import torch
import torch.utils._pytree as pytree

from ..errors import RefitVerificationError, SerializationError, TorchRefitError
from ..filecheck import check_state, store_bytes
from ..fileio import sweep_orphans
from ..module import CompiledModule, InputGuard
from ..refit import refit_module_weights
from ..refit.evaluate import evaluate
from ..refit.files import read_tensor
from ..refit.match import fast
from ..refit.read import read
from ..refit.verify import compare_outputs
from ..serialize import MALFORMED, load, open_file, weights_bytes, write
from ..settings import Settings
from .progress import progress

# what refit --verify of torchrefit 0.1 left beside its output when killed (never locked)
LEGACY_TEMPORARIES = re.compile(r"\.torchrefit-[A-Za-z0-9_]+\.trf")
LEGACY_AGE = 3600
SHOWN = 200  # characters of a value read from a file that `inspect` shows
SAMPLE_BYTES = 1 << 30  # random inputs refit --verify may make, beyond the file's size


def add_inspect(commands: Any, common: argparse.ArgumentParser) -> None:
    inspect = commands.add_parser(
        "inspect",
        parents=[common],
        help="engines, constants, settings and fingerprint of a file (reads no code)",
    )
    inspect.add_argument("file", help="a file written by torchrefit.save")
    inspect.add_argument("--json", action="store_true", help="print the summary as JSON")
    inspect.set_defaults(run=_inspect)


def add_refit(commands: Any, common: argparse.ArgumentParser) -> None:
    refit = commands.add_parser(
        "refit", parents=[common], help="refit a saved module with new weights, save the result"
    )
    refit.add_argument(
        "file", help="a file written by torchrefit.save (its engines are loaded: trust it)"
    )
    refit.add_argument(
        "weights", help="a safetensors file, a sharded checkpoint's index or its directory"
    )
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


# -- inspect --------------------------------------------------------------------------------


def _inspect(args: argparse.Namespace, err: TextIO) -> None:
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
    """What a file holds, from its JSON metadata alone: no engine is loaded, nothing runs or
    is imported (dtypes are looked up in a table), and every value shown is checked or
    shortened, so the summary stays proportional to the file."""
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
        sizes = {name: info.file_size for name, info in archive.members.items()}
    state, stripped = metadata["state"], set(metadata.get("stripped", []))
    check_state(state, path)
    constants = [
        {
            "name": name,
            "dtype": spec["dtype"],
            "shape": spec["shape"],
            "bytes": store_bytes(spec, path),
            "lineage": state["lineage"][name]["kind"],
            "note": _shown(state["lineage"][name].get("note", "")),
            "stripped": name in stripped,
        }
        for name, spec in state["store"].items()
    ]
    children = []
    for child in metadata["children"]:
        entry = {
            "name": _shown(child["name"]),
            "kind": "engine" if child["kind"] == "engine" else "fallback",
            "constants": len(child["constant_keys"]),
        }
        if child["kind"] == "engine":
            entry["sha256"] = _shown(child["sha256"])
            entry["artifact_bytes"] = sizes.get(f"engines/{child['name']}.bin", 0)
        children.append(entry)
    return {
        "version": metadata["version"],
        "torch_version": _shown(metadata["torch_version"]),
        "fingerprint": _shown(state["fingerprint"]),
        "settings": _settings(state["settings"]),
        "children": children,
        "constants": constants,
        "weight_bytes": sum(c["bytes"] for c in constants),
        "stripped": bool(stripped),
    }


def _settings(data: Any) -> dict[str, Any]:
    """The settings fields a file records, each value shown as stored (shortened)."""
    if not isinstance(data, dict):
        raise SerializationError("The file's settings are not a JSON object.")
    names = [f.name for f in dataclasses.fields(Settings)]
    return {name: _value(data[name]) for name in names if name in data}


def _value(value: Any) -> Any:
    text = json.dumps(value)
    return value if len(text) <= SHOWN else text[:SHOWN] + "..."


def _shown(value: Any) -> str:
    return str(value)[:SHOWN]


# -- refit ----------------------------------------------------------------------------------


def _refit(args: argparse.Namespace, err: TextIO) -> None:
    started = time.perf_counter()
    name_map = (lambda n: n.removeprefix(args.strip_prefix)) if args.strip_prefix else None
    directory = os.path.dirname(os.path.abspath(args.output))
    sweep_orphans(directory, LEGACY_TEMPORARIES, LEGACY_AGE)
    with progress(err) as status:
        status.stage(f"loading engines from {args.file} ({size_text(args.file)})")
        module = load(args.file, weights_bytes=weights_bytes(args.weights))
        status.stage(f"refitting from {args.weights} ({size_text(args.weights)})")
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
            write(module, args.output)
    print(
        f"refitted {args.file} with {args.weights} -> {args.output} ({size_text(args.output)}) "
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
    """Write `output` through a temporary (the atomic write's own: locked while this process
    lives, so a kill leaves an orphan the next write sweeps), load the temporary as a user
    would and run it and the module on random inputs shaped as the compiled example; only a
    file that computes the same replaces `output`. Returns the largest output difference."""
    found: list[float] = []

    def check(written: str) -> None:
        reloaded = load(written)
        args, kwargs = _sample_inputs(module, os.path.getsize(written))
        with torch.no_grad():
            expected = module.run_program(*_cloned(args), **_cloned(kwargs))
            got = reloaded.run_program(*_cloned(args), **_cloned(kwargs))
        error = compare_outputs(got, expected)
        if error is not None:
            raise RefitVerificationError(
                f"{output!r}, loaded again, does not compute what the refitted module does: "
                f"{error.replace('eager', 'the refitted module')}. The output was not written."
            )
        found.append(_largest_difference(got, expected))

    write(module, output, check=check)
    return found[0]


def _sample_inputs(module: CompiledModule, file_bytes: int) -> tuple[tuple[Any, ...], dict]:
    """Random inputs of the compiled dtypes and shapes (a dynamic dimension at the example's
    size); integer inputs are 0 or 1, valid token ids and indices for any model. Their size
    is checked first: shapes come from the file."""
    state = module._torchrefit
    tensors = [g for g in state.guards if g.dtype is not None]
    total = sum(_numel(g.example_size()) * g.dtype.itemsize for g in tensors if g.dtype)
    if total > file_bytes + SAMPLE_BYTES:
        raise TorchRefitError(
            f"The compiled inputs take {total / 1e6:.0f} MB, far more than the file; --verify "
            "will not make them. Refit without --verify, or verify in Python "
            "(refit_module_weights(..., arg_inputs=..., verify_output=True))."
        )
    flat = [_sample(g) for g in state.guards]
    args, kwargs = pytree.tree_unflatten(flat, state.in_spec)
    return tuple(args), dict(kwargs)


def _numel(shape: list[int]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


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


def size_text(path: str) -> str:
    try:
        size = os.path.getsize(path)
    except OSError:
        return "size unknown"
    return f"{size / 1e6:.1f} MB" if size >= 1e5 else f"{size} bytes"
