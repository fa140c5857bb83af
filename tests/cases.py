"""The models every refit property is checked on: a builder (seed -> model) and inputs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from models import (
    MLP,
    ConvBNWithRunningStats,
    ConvNet,
    LiftedScalarConstant,
    TiedEmbeddings,
    bert,
    gpt2,
    randomize,
    resnet,
)


@dataclass(frozen=True)
class Case:
    build: Callable[[int], torch.nn.Module]
    inputs: Callable[[], tuple[torch.Tensor, ...]]
    settings: dict = field(default_factory=dict)


def _ids(vocab: int, shape: tuple[int, int] = (2, 8)) -> Callable[[], tuple[torch.Tensor, ...]]:
    return lambda: (torch.randint(0, vocab, shape),)


CASES = {
    "conv_bn": Case(
        lambda s: randomize(ConvBNWithRunningStats(), s), lambda: (torch.randn(2, 3, 12, 12),)
    ),
    "conv_bn_folded": Case(
        lambda s: randomize(ConvBNWithRunningStats(), s),
        lambda: (torch.randn(2, 3, 12, 12),),
        {"fold_batch_norm": True},
    ),
    "mlp": Case(lambda s: randomize(MLP(), s), lambda: (torch.randn(4, 16),)),
    "scalar_constant": Case(
        lambda s: randomize(LiftedScalarConstant(), s), lambda: (torch.randn(3, 8),)
    ),
    "tied_embeddings": Case(lambda s: randomize(TiedEmbeddings(), s), _ids(20, (2, 5))),
    "conv_net": Case(lambda s: randomize(ConvNet(), s), lambda: (torch.randn(2, 3, 10, 10),)),
    "resnet": Case(resnet, lambda: (torch.randn(2, 3, 32, 32),)),
    "bert": Case(bert, _ids(64)),
    "gpt2": Case(gpt2, _ids(64)),
}
