"""CompiledLM: a decoder step compiled by `compile_lm`, and the generation loop around it.

The step is one compiled program: it takes new tokens, their positions, the cache slots they
go to and the batch's padding mask, writes their keys and values into a static KV cache the
module owns (state buffers in its store: pointer-stable, never refitted), and returns the
logits at the positions asked for. Prefill and decode are the same program at two shapes;
on CUDA the one-token decode shape replays as a CUDA graph per batch size. Weights are the
model's own names, so a CompiledLM refits, saves and loads like any compiled module.
"""

from __future__ import annotations

from typing import Any

import torch

from .errors import InputError
from .module import CompiledModule, LMInfo


class CompiledLM(CompiledModule):
    """`lm(input_ids, attention_mask=None)` returns logits like the model's forward;
    `lm.generate(...)` returns prompt plus new tokens like transformers' `generate`."""

    @property
    def info(self) -> LMInfo:
        info = self._torchrefit.lm
        assert info is not None
        return info

    @property
    def max_batch_size(self) -> int:
        return self.info.max_batch_size

    @property
    def max_seq_len(self) -> int:
        return self.info.max_seq_len

    def __call__(  # type: ignore[override]
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Logits of every position, (batch, length, vocab), computed without a past (the
        cache slots of the positions are overwritten)."""
        batch, length = self._check_prompt(input_ids, attention_mask, 0)
        mask = self._padding_mask(input_ids, attention_mask)
        positions = _positions(mask[:, :length])
        keep = torch.arange(length, device=input_ids.device)
        with self._torchrefit.guard.refit:  # one cache: one user of it at a time
            return self._step(input_ids, positions, keep, mask, keep, graphs=False)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int = 20,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Prompt plus up to `max_new_tokens` new tokens per row, as transformers' generate:
        left-padded batches (`attention_mask` 0 at pads), a row that produced an EOS token
        continues with `pad_token_id`, and generation ends when every row has. One weight
        set serves a whole call: a refit started meanwhile waits for it to end."""
        _check_sampling(max_new_tokens, do_sample, temperature, top_k, top_p)
        batch, prompt = self._check_prompt(input_ids, attention_mask, max_new_tokens)
        if do_sample and generator is not None and generator.device != input_ids.device:
            raise InputError(
                f"generator is on {generator.device}, input_ids on {input_ids.device}; make "
                f"the generator there: torch.Generator({str(input_ids.device)!r})."
            )
        input_ids = input_ids.long()
        eos = self._eos(eos_token_id)
        pad = self._pad(pad_token_id, eos)
        device = input_ids.device
        mask = self._padding_mask(input_ids, attention_mask)
        positions = _positions(mask[:, :prompt])
        slots = torch.arange(self.max_seq_len, device=device)
        last = torch.tensor([prompt - 1], device=device)
        zero = torch.zeros(1, dtype=torch.long, device=device)
        eos_t = torch.tensor(eos, device=device) if eos else None
        ended = torch.full((batch,), max_new_tokens, device=device)  # the step of each EOS
        tokens = [input_ids]
        with self._torchrefit.guard.refit:
            logits = self._step(input_ids, positions, slots[:prompt], mask, last, graphs=False)
            position = positions[:, -1:]
            for step in range(max_new_tokens):
                scores = logits[:, -1, :].float()
                chosen = (
                    _sample(scores, temperature, top_k, top_p, generator)
                    if do_sample
                    else scores.argmax(dim=-1)
                )
                if eos_t is not None:
                    finished = ended < max_new_tokens
                    chosen = torch.where(finished, torch.full_like(chosen, pad), chosen)
                    ended = torch.where(torch.isin(chosen, eos_t) & ~finished, step, ended)
                tokens.append(chosen[:, None].to(input_ids.dtype))
                if step == max_new_tokens - 1 or (
                    # every few steps, one host sync: have all rows ended?
                    eos_t is not None
                    and step % _EOS_CHECK == _EOS_CHECK - 1
                    and bool((ended < max_new_tokens).all())
                ):
                    break
                position = position + 1
                slot = slots[prompt + step : prompt + step + 1]
                logits = self._step(tokens[-1], position, slot, mask, zero, graphs=True)
        final = int(ended.max()) if eos_t is not None else max_new_tokens
        if final < max_new_tokens:  # every row ended: as transformers, end at the last EOS
            tokens = tokens[: 2 + final]
        return torch.cat(tokens, dim=1)

    # -- internals --------------------------------------------------------------------------

    def _step(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        cache_position: torch.Tensor,
        attention_mask: torch.Tensor,
        logits_index: torch.Tensor,
        graphs: bool,
    ) -> torch.Tensor:
        kwargs = {
            "input_ids": input_ids,
            "position_ids": position_ids,
            "cache_position": cache_position,
            "attention_mask": attention_mask,
            "logits_index": logits_index,
        }
        use_graphs = graphs and self._torchrefit.settings.cuda_graphs
        return self._run((), kwargs, use_graphs)  # type: ignore[no-any-return]

    def _check_prompt(
        self, input_ids: Any, attention_mask: Any, max_new_tokens: int
    ) -> tuple[int, int]:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise InputError(
                f"input_ids is {_shown(input_ids)}; CompiledLM expects token ids of shape "
                "(batch, length): add a batch dimension (input_ids[None])."
            )
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise InputError(
                f"input_ids has dtype {input_ids.dtype}; token ids are integers (torch.long)."
            )
        batch, length = input_ids.shape
        if not 1 <= batch <= self.max_batch_size:
            raise InputError(
                f"input_ids holds {batch} rows; this CompiledLM was compiled for at most "
                f"{self.max_batch_size} (max_batch_size). Split the batch, or compile_lm again "
                "with a larger max_batch_size."
            )
        if length < 1 or length + max_new_tokens > self.max_seq_len:
            raise InputError(
                f"A prompt of {length} tokens plus max_new_tokens={max_new_tokens} needs "
                f"{length + max_new_tokens} cache positions; this CompiledLM holds "
                f"{self.max_seq_len} (max_seq_len). Shorten the prompt or max_new_tokens, or "
                "compile_lm again with a larger max_seq_len."
            )
        if attention_mask is not None and (
            not isinstance(attention_mask, torch.Tensor)
            or tuple(attention_mask.shape) != (batch, length)
        ):
            raise InputError(
                f"attention_mask is {_shown(attention_mask)}; it must have the shape of "
                f"input_ids, {[batch, length]} (1 for tokens, 0 for left padding)."
            )
        if attention_mask is not None and bool((attention_mask[:, -1] == 0).any()):
            raise InputError(
                "attention_mask is 0 at the last position of some row: pad prompts on the "
                "left (tokenizer.padding_side = 'left'), as generation continues on the right."
            )
        vocab = self.info.vocab_size
        if bool(((input_ids < 0) | (input_ids >= vocab)).any()):
            raise InputError(f"input_ids holds ids outside the vocabulary [0, {vocab}).")
        return batch, length

    def _padding_mask(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
    ) -> torch.Tensor:
        """The padding mask of every cache slot: the prompt's, then 1 for what comes."""
        batch, length = input_ids.shape
        mask = torch.ones(batch, self.max_seq_len, dtype=torch.long, device=input_ids.device)
        if attention_mask is not None:
            mask[:, :length] = attention_mask.to(device=input_ids.device, dtype=torch.long)
        return mask

    def _eos(self, eos_token_id: int | list[int] | None) -> tuple[int, ...]:
        if eos_token_id is None:
            return self.info.eos_token_id
        ids = (eos_token_id,) if isinstance(eos_token_id, int) else tuple(eos_token_id)
        if not all(isinstance(t, int) and 0 <= t < self.info.vocab_size for t in ids):
            raise InputError(
                f"eos_token_id is {eos_token_id!r}; give a token id (or a list of them) in "
                f"[0, {self.info.vocab_size})."
            )
        return ids

    def _pad(self, pad_token_id: int | None, eos: tuple[int, ...]) -> int:
        if pad_token_id is not None:
            return int(pad_token_id)
        if self.info.pad_token_id is not None:
            return self.info.pad_token_id
        return eos[0] if eos else 0  # as transformers does: finished rows repeat EOS


_EOS_CHECK = 8  # decode steps between checks that every row has ended (each a host sync)


def _positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids of a left-padded prompt, as transformers' generate makes them."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def _check_sampling(
    max_new_tokens: Any, do_sample: bool, temperature: Any, top_k: Any, top_p: Any
) -> None:
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise InputError(f"max_new_tokens is {max_new_tokens!r}; give a positive int.")
    if not do_sample:
        return
    if not isinstance(temperature, (int, float)) or not temperature > 0:
        raise InputError(f"temperature is {temperature!r}; give a positive number.")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise InputError(f"top_k is {top_k!r}; give a positive int, or None.")
    if top_p is not None and (not isinstance(top_p, (int, float)) or not 0 < top_p <= 1):
        raise InputError(f"top_p is {top_p!r}; give a number in (0, 1], or None.")


def _sample(
    scores: torch.Tensor,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """One token per row: temperature, then top-k, then top-p (nucleus), as transformers'
    logits warpers apply them, then a draw from the softmax."""
    scores = scores / temperature
    if top_k is not None and top_k < scores.shape[-1]:
        kth = torch.topk(scores, top_k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        ordered, order = torch.sort(scores, descending=False, dim=-1)
        cumulative = ordered.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative <= (1 - top_p)
        drop[:, -1] = False  # the most likely token always stays
        scores = scores.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    probs = scores.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def _shown(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"a tensor of {x.dtype}{list(x.shape)}"
    return f"{type(x).__name__} {x!r}"[:80]


__all__ = ["CompiledLM"]
