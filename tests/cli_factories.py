"""Factories the command-line tests name as MODULE:FACTORY."""

from __future__ import annotations

import torch


class Branchy(torch.nn.Module):
    """Branches on a tensor's value: torch.export logs its graph before it fails."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return self.fc(x)
        return x


class Raising(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("this forward always fails.")


def branchy() -> torch.nn.Module:
    return Branchy()


def raising() -> torch.nn.Module:
    return Raising()


def tiny_lm() -> torch.nn.Module:
    """A GPT-2 of random weights, seeded: every call makes the same model."""
    import transformers

    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=2, n_head=2, n_embd=32, vocab_size=64, n_positions=64, eos_token_id=2
    )
    return transformers.GPT2LMHeadModel(config)
