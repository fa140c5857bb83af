"""`torchrefit compile` (a model from a factory, for random inputs of given shapes) and
`torchrefit compile-lm` (a transformers causal LM from a factory, with its KV cache limits)."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
from typing import Any, TextIO

import torch

from ..compile import compile as compile_model
from ..decoder import compile_lm
from ..errors import TorchRefitError
from ..serialize import save
from ..settings import Settings
from ..tables import DTYPES
from .files import size_text
from .progress import progress


def add_compile(commands: Any, common: argparse.ArgumentParser) -> None:
    compile_ = commands.add_parser(
        "compile",
        parents=[common],
        help="compile a model made by MODULE:FACTORY for random inputs of given shapes",
    )
    compile_.add_argument("model", help='"package.module:factory"; factory() returns an nn.Module')
    compile_.add_argument(
        "--input",
        action="append",
        required=True,
        metavar="SHAPE[:DTYPE]",
        help='one per positional input, e.g. "8,3,224,224" or "8,128:int64" (default float32)',
    )
    _add_common(compile_)
    compile_.set_defaults(run=_compile)


def add_compile_lm(commands: Any, common: argparse.ArgumentParser) -> None:
    lm = commands.add_parser(
        "compile-lm",
        parents=[common],
        help="compile a transformers causal LM made by MODULE:FACTORY for generation "
        "(torchrefit.compile_lm: a static KV cache of the given limits)",
    )
    lm.add_argument(
        "model", help='"package.module:factory"; factory() returns a transformers causal LM'
    )
    lm.add_argument("--max-batch-size", type=int, required=True, help="rows of the KV cache")
    lm.add_argument(
        "--max-seq-len", type=int, required=True, help="positions of the KV cache (prompt + new)"
    )
    lm.add_argument(
        "--decode-batch-size",
        type=int,
        action="append",
        metavar="N",
        help="a batch size whose decode step gets engines of its own exact shape (repeat for "
        "several; default: 1 on a GPU, none on a CPU)",
    )
    _add_common(lm)
    lm.set_defaults(run=_compile_lm)


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a Settings field, e.g. backend=eager, dtype=float16, min_block_size=3",
    )
    parser.add_argument("--device", default=None, help="where the model runs (default cpu)")
    parser.add_argument("-o", "--output", required=True, help="the file to write")
    parser.add_argument(
        "--no-weights", action="store_true", help="save without weights (a small file)"
    )


def _compile(args: argparse.Namespace, err: TextIO) -> None:
    settings = Settings.from_overrides(**_overrides(args.set))
    inputs = tuple(_example(spec, args.device or "cpu") for spec in args.input)
    started = time.perf_counter()
    with progress(err) as status:
        status.stage(f"importing {args.model}")
        model = _model(args.model)
        status.stage(f"compiling {args.model}")
        compiled = compile_model(model.eval(), inputs, settings=settings)
        status.stage(f"saving {args.output}")
        save(compiled, args.output, include_weights=not args.no_weights)
    print(
        f"compiled {args.model} into {len(compiled.engines())} engine(s) -> {args.output} "
        f"({size_text(args.output)}) in {time.perf_counter() - started:.1f} s"
    )


def _compile_lm(args: argparse.Namespace, err: TextIO) -> None:
    """The model is converted to the dtype and device the settings (or --device) name before
    compile_lm, which compiles a model in its own dtype and on its own device."""
    overrides = _overrides(args.set)
    wanted = Settings.from_overrides(**overrides)  # checked before the model is made
    device = args.device or wanted.device
    started = time.perf_counter()
    with progress(err) as status:
        status.stage(f"importing {args.model}")
        model = _model(args.model).eval()
        if wanted.torch_dtype is not None or device is not None:
            model = model.to(dtype=wanted.torch_dtype, device=device)
        if "device" in overrides:  # "cuda" names the device the model went to: "cuda:0"
            overrides["device"] = str(next(model.parameters()).device)
        status.stage(f"compiling {args.model} for generation")
        lm = compile_lm(
            model,
            args.max_batch_size,
            args.max_seq_len,
            decode_batch_sizes=args.decode_batch_size,
            **overrides,
        )
        status.stage(f"saving {args.output}")
        save(lm, args.output, include_weights=not args.no_weights)
    print(
        f"compiled {args.model} for generation (max_batch_size {lm.max_batch_size}, "
        f"max_seq_len {lm.max_seq_len}) into {len(lm.engines())} engine(s) -> {args.output} "
        f"({size_text(args.output)}) in {time.perf_counter() - started:.1f} s"
    )


def _model(spec: str) -> torch.nn.Module:
    model = _factory(spec)()
    if not isinstance(model, torch.nn.Module):
        raise TorchRefitError(f"{spec} returned a {type(model).__name__}; expected an nn.Module.")
    return model


def _factory(spec: str) -> Any:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise TorchRefitError(f"MODEL is {spec!r}; expected 'package.module:factory'.")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())  # as `python -m` does: the current directory's packages
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise TorchRefitError(
            f"Cannot import {spec!r} ({exc}). Run the command where `import {module_name}` "
            "works (the current directory counts), or add its directory to PYTHONPATH."
        ) from exc


def _example(spec: str, device: str) -> torch.Tensor:
    shape_text, _, dtype_text = spec.partition(":")
    try:
        shape = [int(d) for d in shape_text.split(",")]
    except ValueError as exc:
        raise TorchRefitError(
            f"--input {spec!r}: expected comma-separated sizes, e.g. 8,3,224,224."
        ) from exc
    dtype = DTYPES.get(dtype_text or "float32")
    if dtype is None:
        raise TorchRefitError(
            f"--input {spec!r}: unknown dtype {dtype_text!r}; e.g. float16, int64 or bool."
        )
    if dtype.is_floating_point:
        return torch.randn(shape, dtype=dtype, device=device)
    return torch.randint(0, 2, shape, dtype=dtype, device=device)


def _overrides(items: list[str]) -> dict[str, Any]:
    return dict(_setting(item) for item in items)


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
