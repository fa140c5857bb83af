"""CompiledLM: a decoder step compiled by `compile_lm`, and the generation loop around it.

The step is one compiled program: it takes new tokens, their positions, the cache slots they
go to and the batch's padding mask, writes their keys and values into a static KV cache the
module owns (state buffers in its store: pointer-stable, never refitted), and returns the
logits at the positions asked for. Prefill and decode are the same program at two shapes;
on CUDA the one-token decode shape replays as a CUDA graph per batch size. Weights are the
model's own names, so a CompiledLM refits, saves and loads like any compiled module.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from .errors import InputError
from .generation import KEYWORDS, Chooser, Generation, resolve, sizes, unsupported
from .module import CompiledModule, LMInfo

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from .generation import GenerateKwargs


@dataclass(frozen=True)
class GenerateOutput:
    """`generate(..., return_logprobs=True)`: the sequences generate returns, and the
    log-probability of each new token under the model's raw logits (float32, (rows, new
    tokens); 0 after a row's EOS, the EOS itself counted)."""

    sequences: torch.Tensor
    logprobs: torch.Tensor


class CompiledLM(CompiledModule):
    """`lm(input_ids, attention_mask=None)` returns logits like the model's forward (positions
    from the mask, as generate makes them); `lm.generate(...)` returns prompt plus new tokens
    like transformers' `generate`."""

    generate_options = KEYWORDS  # the keywords generate takes beside the first three

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
        """Logits of every position, (batch, length, vocab), computed without a past. The
        position ids come from the mask (cumulative sum, as generate makes them), so logits
        of a left-padded row equal the model's forward given those position_ids."""
        batch, length = self._check_tokens(input_ids, attention_mask)
        self._check_room(batch, length, 0)
        self._check_values(input_ids, attention_mask)
        mask = self._padding_mask(input_ids, attention_mask)
        positions = _positions(mask[:, :length])
        keep = torch.arange(length, device=input_ids.device)
        with self._torchrefit.guard.refit:  # one cache: one user of it at a time
            self._clean_cache(batch, length, length)
            return self._step(input_ids, positions, keep, mask, keep, graphs=False)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int | None = None,
        **options: Unpack[GenerateKwargs],
    ) -> torch.Tensor | GenerateOutput:
        """Prompt plus up to `max_new_tokens` new tokens per row, as transformers' generate:
        left-padded batches (`attention_mask` 0 at pads), `num_return_sequences` rows per
        prompt (prompt-major), a row that produced an EOS token continues with
        `pad_token_id`, and generation ends when every row has. The keywords are
        transformers' (`CompiledLM.generate_options`); a `generation_config`'s set fields
        are their defaults. Every argument is checked before any work. One weight set
        serves a whole call: a refit started meanwhile waits for it to end."""
        batch, length = self._check_tokens(input_ids, attention_mask)
        info = self.info
        g = resolve(options, max_new_tokens, length, info.vocab_size, info.eos_token_id,
                    info.pad_token_id, input_ids.device)  # fmt: skip
        rows = batch * g.num_return_sequences
        self._check_room(rows, length, g.max_new_tokens, g.num_return_sequences)
        self._check_values(input_ids, attention_mask)
        ids = input_ids.long().repeat_interleave(g.num_return_sequences, dim=0)
        mask = attention_mask
        if mask is not None:
            mask = mask.repeat_interleave(g.num_return_sequences, dim=0)
        with self._torchrefit.guard.refit:
            self._clean_cache(rows, length, length + g.max_new_tokens)
            sequences, logprobs = self._decode(ids, mask, g)
        if g.return_logprobs:
            assert logprobs is not None
            return GenerateOutput(sequences, logprobs)
        return sequences

    def run_program(self, *args: Any, **kwargs: Any) -> Any:
        """The step program itself (see CompiledModule.run_program); it may write any slot."""
        with self._torchrefit.guard.refit:
            self.__dict__.pop("_cache_written", None)
            return super().run_program(*args, **kwargs)

    @staticmethod
    def call_size(
        input_ids: Any, max_new_tokens: Any, options: Mapping[str, Any], default: int
    ) -> tuple[int, int, int]:
        """(rows, prompt length, new tokens) of a generate call, its sizes checked: what a
        CompiledLM must hold to take it. `default`: new tokens where nothing bounds them."""
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise InputError(
                f"input_ids is {_shown(input_ids)}; generate expects token ids of shape "
                "(batch, length): add a batch dimension (input_ids[None])."
            )
        batch, length = input_ids.shape
        count, new = sizes(options, max_new_tokens, length, default)
        return batch * count, length, new

    @staticmethod
    def unsupported_options(options: Mapping[str, Any]) -> list[str]:
        """The options generate cannot honour (empty: it takes the call)."""
        return unsupported(options)

    # -- internals --------------------------------------------------------------------------

    def _decode(
        self, ids: torch.Tensor, padding: torch.Tensor | None, g: Generation
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Prefill, then one decode step per new token; (sequences, logprobs)."""
        device = ids.device
        prompt = ids.shape[1]
        mask = self._padding_mask(ids, padding)
        positions = _positions(mask[:, :prompt])
        slots = torch.arange(self.max_seq_len, device=device)
        last = torch.tensor([prompt - 1], device=device)
        zero = torch.zeros(1, dtype=torch.long, device=device)
        choose = Chooser(g, ids, padding, self.info.vocab_size)
        ends = _Ends(g, ids.shape[0], device)
        tokens, logprobs = [ids], []
        logits = self._step(ids, positions, slots[:prompt], mask, last, graphs=False)
        position = positions[:, -1:]
        for step in range(g.max_new_tokens):
            chosen, logprob = ends.mark(*choose(logits[:, -1, :], step, ends.rows), step)
            choose.saw(chosen)
            tokens.append(chosen[:, None])
            logprobs.append(logprob)
            if step == g.max_new_tokens - 1 or ends.poll(step):
                break
            position = position + 1
            slot = slots[prompt + step : prompt + step + 1]
            logits = self._step(tokens[-1], position, slot, mask, zero, graphs=True)
        new = ends.new_tokens(len(tokens) - 1)
        sequences = torch.cat(tokens[: 1 + new], dim=1)
        if not g.return_logprobs:
            return sequences, None
        return sequences, torch.stack(logprobs[:new], dim=1)  # type: ignore[arg-type]

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

    def _clean_cache(self, rows: int, length: int, end: int) -> None:
        """Zero what earlier requests wrote in the slots this one reads but does not write
        (rows [:rows], slots from `length` on): attention gives them zero weight, which
        still lets a NaN through, and a padding query attends to every slot. `end`: the
        slots this request writes. Costs nothing when earlier requests wrote no further."""
        store = self._torchrefit.store
        known = self.__dict__.get("_cache_written")
        if known is None or known[0]() is not store:  # unknown: a new or flipped store
            dirty_rows, dirty_end = store[self.info.cache_keys[0]].shape[0], self.max_seq_len
        else:
            dirty_rows, dirty_end = known[1], known[2]
        stale = min(rows, dirty_rows)
        if stale and dirty_end > length:
            with torch.no_grad():
                for key in self.info.cache_keys:
                    store[key][:stale, :, length:dirty_end].zero_()
        if dirty_rows > rows:  # rows beyond this request keep what they held
            end = max(end, dirty_end)
        self.__dict__["_cache_written"] = (weakref.ref(store), max(rows, dirty_rows), end)

    def _check_tokens(self, input_ids: Any, attention_mask: Any) -> tuple[int, int]:
        """Types, shapes and devices of the token inputs (no value read: no sync)."""
        device = self._torchrefit.store.device
        if (
            not isinstance(input_ids, torch.Tensor)
            or input_ids.layout != torch.strided
            or input_ids.dim() != 2
        ):
            raise InputError(
                f"input_ids is {_shown(input_ids)}; CompiledLM expects a dense tensor of token "
                "ids of shape (batch, length): add a batch dimension (input_ids[None])."
            )
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise InputError(
                f"input_ids has dtype {input_ids.dtype}; token ids are integers (torch.long)."
            )
        if input_ids.device != device:
            raise InputError(
                f"input_ids is on {input_ids.device}; this CompiledLM runs on {device}. Pass "
                f"input_ids.to({str(device)!r})."
            )
        batch, length = input_ids.shape
        if batch < 1 or length < 1:
            raise InputError(f"input_ids has shape {[batch, length]}; give at least one token.")
        if attention_mask is None:
            return batch, length
        if (
            not isinstance(attention_mask, torch.Tensor)
            or attention_mask.layout != torch.strided
            or tuple(attention_mask.shape) != (batch, length)
        ):
            raise InputError(
                f"attention_mask is {_shown(attention_mask)}; it must be a dense tensor of the "
                f"shape of input_ids, {[batch, length]} (1 for tokens, 0 for left padding)."
            )
        if attention_mask.is_complex():
            raise InputError(
                f"attention_mask has dtype {attention_mask.dtype}; give 1 and 0 as bool, "
                "integers or floats."
            )
        if attention_mask.device != device:
            raise InputError(
                f"attention_mask is on {attention_mask.device}; this CompiledLM runs on "
                f"{device}. Pass attention_mask.to({str(device)!r})."
            )
        return batch, length

    def _check_room(self, rows: int, length: int, new: int, count: int = 1) -> None:
        """The call fits the cache: its rows, its prompt and new tokens."""
        if rows > self.max_batch_size:
            each = f" ({rows // count} prompts x num_return_sequences={count})" if count > 1 else ""
            raise InputError(
                f"The call generates {rows} rows{each}; this CompiledLM was compiled for at most "
                f"{self.max_batch_size} (max_batch_size). Split the batch, or compile_lm again "
                "with a larger max_batch_size."
            )
        if length + new > self.max_seq_len:
            raise InputError(
                f"A prompt of {length} tokens plus max_new_tokens={new} needs {length + new} "
                f"cache positions; this CompiledLM holds {self.max_seq_len} (max_seq_len). "
                "Shorten the prompt or max_new_tokens, or compile_lm again with a larger "
                "max_seq_len."
            )

    def _check_values(self, input_ids: torch.Tensor, mask: torch.Tensor | None) -> None:
        """Token ids in the vocabulary, a mask of 0 and 1 that is 1 in the last column: one
        read (one host sync) for all of it."""
        vocab = self.info.vocab_size
        flags = [((input_ids < 0) | (input_ids >= vocab)).any()]
        if mask is not None:
            flags += [((mask != 0) & (mask != 1)).any(), (mask[:, -1] == 0).any()]
        bad = torch.stack(flags).tolist()
        if bad[0]:
            raise InputError(f"input_ids holds ids outside the vocabulary [0, {vocab}).")
        if mask is not None and bad[1]:
            raise InputError(
                "attention_mask holds values other than 0 and 1 (or NaN); give 1 for tokens "
                "and 0 for left padding."
            )
        if mask is not None and bad[2]:
            raise InputError(
                "attention_mask is 0 at the last position of some row: pad prompts on the "
                "left (tokenizer.padding_side = 'left'), as generation continues on the right."
            )

    def _padding_mask(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
    ) -> torch.Tensor:
        """The padding mask of every cache slot: the prompt's, then 1 for what comes."""
        batch, length = input_ids.shape
        mask = torch.ones(batch, self.max_seq_len, dtype=torch.long, device=input_ids.device)
        if attention_mask is not None:
            mask[:, :length] = attention_mask.to(dtype=torch.long)
        return mask


_EOS_CHECK = 8  # decode steps between checks of which rows ended (each a host sync)


class _Ends:
    """Which rows have ended (the step of each row's EOS, on the device), and, refreshed
    every `_EOS_CHECK` steps with one host sync, the rows still generating."""

    def __init__(self, g: Generation, batch: int, device: torch.device) -> None:
        self.eos = torch.tensor(g.eos, device=device) if g.eos else None
        self.limit, self.pad = g.max_new_tokens, g.pad
        self.ended = torch.full((batch,), g.max_new_tokens, device=device)
        self.rows: torch.Tensor | None = None  # None: every row

    def mark(
        self, chosen: torch.Tensor, logprobs: torch.Tensor | None, step: int
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A row that ended continues with pad (log-probability 0); note new EOS tokens."""
        if self.eos is None:
            return chosen, logprobs
        finished = self.ended < self.limit
        chosen = chosen.masked_fill(finished, self.pad)
        if logprobs is not None:
            logprobs = logprobs.masked_fill(finished, 0.0)
        self.ended = torch.where(torch.isin(chosen, self.eos) & ~finished, step, self.ended)
        return chosen, logprobs

    def poll(self, step: int) -> bool:
        """Whether every row has ended; every few steps, else False without a sync."""
        if self.eos is None or step % _EOS_CHECK != _EOS_CHECK - 1:
            return False
        done = (self.ended < self.limit).cpu()
        if bool(done.all()):
            return True
        if bool(done.any()):
            self.rows = (~done).nonzero().squeeze(1).to(self.ended.device)
        return False

    def new_tokens(self, made: int) -> int:
        """New tokens to return: up to the last row's EOS when every row ended (as
        transformers), else all `made`."""
        if self.eos is None:
            return made
        last = int(self.ended.max())
        return last + 1 if last < self.limit else made


def _positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids of a left-padded prompt, as transformers' generate makes them."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def _shown(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"a tensor of {x.dtype}{list(x.shape)}"
    return f"{type(x).__name__} {x!r}"[:80]


__all__ = ["CompiledLM", "GenerateOutput"]
