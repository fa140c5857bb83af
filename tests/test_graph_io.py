"""Graphs stored as data: round trip, and refusal of anything that is not an op."""

from __future__ import annotations

import json

import pytest
import torch
import torch.fx as fx

import torchrefit
from torchrefit.graph_io import graph_from_json, graph_to_json

from cases import CASES


def test_round_trip_runs_the_same() -> None:
    case = CASES["bert"]
    ep = torch.export.export(case.build(0), case.inputs()).run_decompositions()
    gm = ep.module()
    data = json.loads(json.dumps(graph_to_json(ep.graph)))
    graph = graph_from_json(data)
    assert [n.op for n in graph.nodes] == [n.op for n in ep.graph.nodes]
    assert gm is not None


def test_refuses_arbitrary_targets() -> None:
    graph = fx.Graph()
    x = graph.placeholder("x")
    graph.output(graph.call_function(print, (x,)))
    with pytest.raises(torchrefit.UnsupportedGraphError, match="print"):
        graph_to_json(graph)
    stored = [
        {"name": "x", "op": "placeholder", "args": {"tuple": []}, "kwargs": {}},
        {
            "name": "y",
            "op": "call_function",
            "target": "os.system",
            "args": {"tuple": [{"node": "x"}]},
            "kwargs": {},
        },
    ]
    with pytest.raises(torchrefit.UnsupportedGraphError, match="os.system"):
        graph_from_json(stored)
