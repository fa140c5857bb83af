"""Tiny named models, one property each, and real architectures from small configs."""

from __future__ import annotations

import torch
from torch import nn


class ConvBNWithRunningStats(nn.Module):
    """Batch norm with non-default running statistics and eps: folding must use them all."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8, eps=1e-3)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8, eps=0.1)
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.conv2(y)) + y)
        return self.head(y.mean((2, 3)))


class MLP(nn.Module):
    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, width)
        self.fc2 = nn.Linear(width, width)
        self.fc3 = nn.Linear(width, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.nn.functional.gelu(self.fc2(torch.tanh(self.fc1(x)))))


class LiftedScalarConstant(nn.Module):
    """A plain tensor attribute (not a parameter or buffer): export lifts it as a constant."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.scale = torch.tensor(1.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) * self.scale


class TiedEmbeddings(nn.Module):
    """One parameter under two names, as GPT-2 ties its input and output embeddings."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.out = nn.Linear(8, 20, bias=False)
        self.out.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.embed(ids)))


class ConvNet(nn.Module):
    """Convolutions between other ops: torch_executed_ops on convolution gives many blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 6, 3, padding=1)
        self.c2 = nn.Conv2d(6, 6, 3, padding=1)
        self.c3 = nn.Conv2d(6, 4, 1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.relu(self.c1(x)) * 0.5
        y = torch.sigmoid(self.c2(y)) + y
        z = self.c3(y)
        return self.fc(z.mean((2, 3))), z


class NonContiguousWeight(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


def randomize(model: nn.Module, seed: int) -> nn.Module:
    """Fill every parameter and floating buffer with fresh values (weights B, C, ...)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
            if not tensor.is_floating_point():
                continue
            values = torch.randn(tensor.shape, generator=gen, dtype=torch.float32) * 0.5
            if name.endswith("running_var"):
                values = values.abs() + 0.5
            tensor.copy_(values.to(tensor.dtype))
        for module in model.modules():  # plain tensor attributes
            for key, value in list(vars(module).items()):
                if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter):
                    setattr(module, key, torch.rand((), generator=gen) + 0.5)
    return model.eval()


def resnet(seed: int = 0) -> nn.Module:
    from transformers import ResNetConfig, ResNetModel

    torch.manual_seed(seed)
    config = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic")
    return randomize(ResNetModel(config), seed)


def bert(seed: int = 0) -> nn.Module:
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=48,
        max_position_embeddings=32,
    )
    return randomize(BertModel(config), seed)


def gpt2(seed: int = 0) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        n_layer=2,
        n_head=2,
        n_embd=32,
        vocab_size=64,
        n_positions=32,
        use_cache=False,
        bos_token_id=0,
        eos_token_id=0,
    )
    return randomize(GPT2LMHeadModel(config), seed)


LM_VOCAB = 256


def generation_gpt2(seed: int = 0) -> nn.Module:
    """A GPT-2 for the generation and quantization tests: a 256-token vocabulary, 128
    positions, the cache on, weights spread wide enough that greedy paths differ by seed."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        n_layer=2, n_head=4, n_embd=64, vocab_size=LM_VOCAB, n_positions=128,
        bos_token_id=1, eos_token_id=2, initializer_range=0.2,
    )  # fmt: skip
    return GPT2LMHeadModel(config).eval()


class OddSizedWithMask(nn.Module):
    """Odd-sized weights (a check kernel's masked last block), one larger than a kernel
    block, and a -inf mask buffer: a constant that may keep inf, never hold NaN."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 601)
        self.fc2 = nn.Linear(601, 7)
        mask = torch.zeros(7)
        mask[-2:] = float("-inf")
        self.register_buffer("mask", mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.fc2(torch.tanh(self.fc1(x))) + self.mask, dim=-1)


def odd_sized_with_mask(seed: int = 0) -> nn.Module:
    model = OddSizedWithMask()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return model.eval()
