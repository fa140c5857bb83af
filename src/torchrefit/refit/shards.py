"""Sharded checkpoints as `save_pretrained` writes them: an index file naming a shard per tensor.

The index (`model.safetensors.index.json`) is data: a JSON object whose "weight_map" maps each
tensor name to a shard's file name. Every shard name must be a plain file name beside the
index, every shard's header is checked like a single file's, and the index and the shards
must agree on where each tensor lies.
"""

from __future__ import annotations

import json
import os
from typing import Any

from ..errors import IncompatibleWeightsError
from ..fileio import kind_of, open_regular
from .files import FileTensor, Header, UntypedTensor, read_header

INDEX_SUFFIX = ".safetensors.index.json"
MAX_INDEX_BYTES = 100_000_000


def in_directory(directory: str) -> str:
    """The checkpoint a directory holds: its one index file, or else its one safetensors file."""
    names = sorted(os.listdir(directory))
    indexes = [n for n in names if n.endswith(INDEX_SUFFIX)]
    files = [n for n in names if n.endswith(".safetensors")]
    if len(indexes) == 1:
        return os.path.join(directory, indexes[0])
    if not indexes and len(files) == 1:
        return os.path.join(directory, files[0])
    found = indexes or files
    raise IncompatibleWeightsError(
        f"Directory {directory!r} holds {found if found else 'no safetensors file'}; torchrefit "
        f"reads a directory holding one *{INDEX_SUFFIX} (a sharded checkpoint) or one "
        "*.safetensors file. Pass the path of the file to read."
    )


def read_index(index: str) -> Header:
    """Every tensor of a sharded checkpoint, each FileTensor pointing into its shard."""
    weight_map = _weight_map(index)
    by_shard: dict[str, list[str]] = {}
    for name, shard in weight_map.items():
        by_shard.setdefault(shard, []).append(name)
    paths = {shard: _shard_path(index, shard) for shard in by_shard}  # every shard exists
    tensors: dict[str, FileTensor] = {}
    untyped: dict[str, UntypedTensor] = {}
    for shard, names in by_shard.items():
        header = read_header(paths[shard])
        held = set(header.tensors) | set(header.untyped)
        _check_agreement(index, shard, names, held, weight_map)
        tensors.update(header.tensors)
        untyped.update(header.untyped)
    return Header(tensors, untyped)


def _weight_map(index: str) -> dict[str, str]:
    """The index's tensor name -> shard file name, checked: a JSON object of strings, read
    from a regular file of bounded size (a FIFO or /dev/zero is refused, never read)."""
    try:
        with open_regular(index) as f:
            if os.fstat(f.fileno()).st_size > MAX_INDEX_BYTES:
                raise ValueError(f"it is larger than {MAX_INDEX_BYTES} bytes")
            text = f.read(MAX_INDEX_BYTES + 1)
        if len(text) > MAX_INDEX_BYTES:  # it grew while read
            raise ValueError(f"it is larger than {MAX_INDEX_BYTES} bytes")
        document = json.loads(text.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except RecursionError as exc:
        raise _bad_index(index, "it nests JSON too deep to parse") from exc
    except (OSError, ValueError) as exc:  # UnicodeDecodeError and JSONDecodeError included
        raise _bad_index(index, str(exc)[:300]) from exc
    weight_map = document.get("weight_map") if isinstance(document, dict) else None
    if not isinstance(weight_map, dict):
        raise _bad_index(index, 'it is not a JSON object with a "weight_map" object')
    for name, shard in weight_map.items():
        if not isinstance(shard, str):
            raise _bad_index(index, f"weight_map maps {name!r} to {shard!r}, not to a file name")
    for shard in set(weight_map.values()):
        _check_shard_name(index, shard)
    return weight_map


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"{key!r} appears twice in one JSON object")
        out[key] = value
    return out


def _check_shard_name(index: str, shard: str) -> None:
    """A shard is a plain file name beside the index: no directories, no way out of it."""
    plain = shard not in ("", ".", "..") and not any(c in shard for c in "/\\:\0")
    if not plain or os.path.isabs(shard):
        raise _bad_index(index, f"it names shard {shard!r}, which is not a plain file name")


def _shard_path(index: str, shard: str) -> str:
    """The shard's path; a link may lead only to a file beside the index or beside the file
    the index links to (as the Hugging Face cache lays out snapshots and blobs)."""
    directory = os.path.dirname(os.path.abspath(index))
    path = os.path.join(directory, shard)
    if not os.path.exists(path):
        raise _bad_index(index, f"its shard {shard!r} does not exist in {directory!r}")
    if not os.path.isfile(path):
        kind = kind_of(os.stat(path).st_mode)
        raise _bad_index(index, f"its shard {shard!r} is {kind}, not a regular file")
    allowed = {os.path.realpath(directory), os.path.dirname(os.path.realpath(index))}
    real = os.path.realpath(path)
    if os.path.dirname(real) not in allowed:
        raise _bad_index(
            index, f"its shard {shard!r} is a link to {real!r}, outside the checkpoint's directory"
        )
    return path


def _check_agreement(
    index: str, shard: str, names: list[str], held: set[str], weight_map: dict[str, str]
) -> None:
    """Each name the index puts in `shard` is there, and the shard holds no other."""
    for name in names:
        if name not in held:
            raise _bad_index(index, f"it puts {name!r} in shard {shard!r}, which does not hold it")
    for name in sorted(held - set(names)):
        other = weight_map.get(name)
        where = f"the index puts it in {other!r}" if other else "the index does not list it"
        raise _bad_index(index, f"shard {shard!r} holds {name!r}, but {where}")


def _bad_index(index: str, why: str) -> IncompatibleWeightsError:
    return IncompatibleWeightsError(
        f"{index!r} is not a usable sharded-checkpoint index ({why}). torchrefit reads the "
        f'index that save_pretrained writes: {{"weight_map": {{tensor name: shard file name}}}}, '
        "its shards beside it."
    )
