"""Runs a partition with PyTorch, op by op: for debugging and fast tests."""

from __future__ import annotations

import json
from typing import Any

import torch
import torch.fx as fx

from ..graph_io import graph_from_json, graph_to_json
from .base import Runner


class EagerBackend:
    name = "eager"

    def supports(self, node: fx.Node) -> bool:
        return True

    def build(self, gm: fx.GraphModule, example_inputs: list[Any]) -> Runner:
        return fx.GraphModule(torch.nn.Module(), gm.graph)

    def specialize(self, gm: fx.GraphModule, example_inputs: list[Any]) -> Runner | None:
        return None  # op by op, one shape runs as any other

    def dump(self, runner: Runner) -> bytes:
        assert isinstance(runner, fx.GraphModule)
        return json.dumps(graph_to_json(runner.graph)).encode()

    def load(self, data: bytes) -> Runner:
        return fx.GraphModule(torch.nn.Module(), graph_from_json(json.loads(data)))
