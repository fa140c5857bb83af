"""What lowering passes share: the program being lowered and the lineage recorder."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch._guards import detect_fake_mode

from ..export import Mutation
from ..settings import Settings
from ..weights import WeightProgram


@dataclass(frozen=True)
class Role:
    """What a placeholder of the lowered graph stands for."""

    kind: str  # "input" (user input, by flat position), "weight" (source FQN), "derived",
    # or "state" (a buffer the forward writes: held in the store, never hoisted or refitted)
    key: str | int

    @property
    def is_weight(self) -> bool:
        """Held in the weight store (weights, derived constants and state)."""
        return self.kind in ("weight", "derived", "state")


@dataclass(frozen=True)
class Lineage:
    """How an engine constant is computed from source weights, recorded by its maker."""

    kind: str  # "identity", "cast" or "program"
    sources: tuple[str, ...]
    note: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "sources": list(self.sources), "note": self.note}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Lineage:
        return cls(data["kind"], tuple(data["sources"]), data.get("note", ""))


@dataclass
class LoweredProgram:
    """A graph whose placeholders are user inputs, source weights and derived weights."""

    gm: fx.GraphModule
    roles: dict[str, Role]  # placeholder name -> role
    weight_dtypes: dict[str, torch.dtype]  # source FQN -> dtype the engine program holds
    weight_program: WeightProgram = field(default_factory=WeightProgram.empty)  # sources -> derived
    derived: dict[str, Lineage] = field(default_factory=dict)  # derived key -> lineage
    notes: dict[fx.Node, str] = field(default_factory=dict)  # node -> which pass made it
    names: dict[fx.Node, str] = field(default_factory=dict)  # node -> derived key it should get
    mutations: list[Mutation] = field(default_factory=list)  # state writes: the first outputs

    def placeholders(self) -> list[fx.Node]:
        return [n for n in self.gm.graph.nodes if n.op == "placeholder"]

    def role(self, node: fx.Node) -> Role | None:
        return self.roles.get(node.name) if node.op == "placeholder" else None

    def labels(self) -> dict[str, str]:
        """Placeholder labels for the structural fingerprint: the role's kind, never a name."""
        return {name: role.kind for name, role in self.roles.items()}

    def weight_order(self) -> list[str]:
        """Source FQNs and derived keys by placeholder position (the slow path pairs them)."""
        return [str(r.key) for r in self.roles.values() if r.is_weight]


@dataclass(frozen=True)
class LoweringContext:
    """Per-call state that passes read; passes never touch globals."""

    settings: Settings


def add_node(
    graph: fx.Graph, target: Any, args: tuple[Any, ...], kwargs: dict | None = None
) -> fx.Node:
    """A call_function node with its fake value computed, so Inductor can trace it."""
    kwargs = kwargs or {}
    node = graph.call_function(target, args, kwargs)
    vals = [a.meta["val"] for a in node.all_input_nodes]
    mode = detect_fake_mode(vals)
    fake_args, fake_kwargs = fx.node.map_arg((args, kwargs), lambda n: n.meta["val"])
    if mode is None:
        node.meta["val"] = target(*fake_args, **fake_kwargs)
    else:
        with mode:
            node.meta["val"] = target(*fake_args, **fake_kwargs)
    return node
