"""CompiledLM.generate as RL loops call it: transformers' options with transformers' results
(tokens equal to its generate, sampled draws included), log-probabilities equal to a
teacher-forced forward, every bad argument a typed error before any work, and no output
that depends on an earlier request."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch

import torchrefit
from tests.test_lm import VOCAB, gpt2, llama, prompts
from torchrefit.generation import Chooser

transformers = pytest.importorskip("transformers")

BUILDERS: dict[str, Callable[..., torch.nn.Module]] = {"gpt2": gpt2, "llama": llama}


def endless(build: Callable[..., torch.nn.Module]) -> torch.nn.Module:
    """A model whose generation config names no EOS: rows run to max_new_tokens."""
    model = build()
    model.generation_config.eos_token_id = None
    return model


def hf_generate(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, **kw: Any) -> Any:
    """transformers' own generate on a copy (it sets attributes on the model)."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return copy.deepcopy(model).generate(ids, attention_mask=mask, **kw)


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def pair(request: pytest.FixtureRequest) -> tuple[torch.nn.Module, torchrefit.CompiledLM]:
    model = endless(BUILDERS[request.param])
    return model, torchrefit.compile_lm(model, max_batch_size=6, max_seq_len=48, backend="eager")


def test_sampled_rows_are_transformers_draws(pair) -> None:
    """num_return_sequences rows laid out prompt-major, sampled with temperature, top-k and
    top-p: under the same seed the very draws transformers makes."""
    model, lm = pair
    ids, mask = prompts(2, 9)
    kw = dict(do_sample=True, temperature=0.8, top_k=20, top_p=0.9, num_return_sequences=3)
    torch.manual_seed(5)
    want = hf_generate(model, ids, mask, max_new_tokens=12, **kw)
    torch.manual_seed(5)
    got = lm.generate(ids, mask, 12, **kw)
    assert got.shape == (6, 21) and torch.equal(got, want)
    assert torch.equal(got[:3, :9], ids[:1].expand(3, 9))  # prompt-major
    assert len({tuple(row) for row in got[:3, 9:].tolist()}) == 3  # three samples, not one


def test_sampling_with_a_generator_is_reproducible(pair) -> None:
    _, lm = pair
    ids, mask = prompts(2, 9)

    def run(seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return lm.generate(ids, mask, 10, do_sample=True, num_return_sequences=3, generator=g)

    first = run(3)
    assert torch.equal(first, run(3)) and not torch.equal(first, run(4))


@pytest.mark.parametrize(
    "options",
    [
        dict(max_new_tokens=14, repetition_penalty=1.4),
        dict(max_new_tokens=14, repetition_penalty=0.7),
        dict(max_length=20),
        dict(max_new_tokens=10, min_new_tokens=6, ends=(0, 1)),
        dict(max_new_tokens=10, min_length=14, ends=(0, 1)),
        dict(max_new_tokens=12, ends=(1, 3, 9)),  # several EOS ids
        dict(max_new_tokens=16, repetition_penalty=1.3, ends=(2, 9)),  # rows end apart
    ],
    ids=["penalty", "reward", "max_length", "min_new", "min_length", "eos_ids", "penalty_eos"],
)
def test_options_give_transformers_greedy_tokens(pair, options: dict[str, Any]) -> None:
    """Greedy tokens equal transformers' for each option; `ends` picks EOS ids among the
    tokens an unconstrained run makes (row 0's at those steps), so rows end where the
    option matters. The left padding is a token the prompt holds, so versions of
    transformers that penalize padding and those that do not agree."""
    model, lm = pair
    ids, mask = prompts(3, 9)
    ids = torch.where(mask.bool(), ids, ids[:, -1:])
    options = dict(options)
    ends = options.pop("ends", None)
    if ends is not None:
        free = lm.generate(ids, mask, 16)
        options["eos_token_id"] = sorted({int(free[row % 3, 9 + s]) for row, s in enumerate(ends)})
        options["pad_token_id"] = 0
    want = hf_generate(model, ids, mask, do_sample=False, **options)
    assert torch.equal(lm.generate(ids, mask, **options), want)
    config = transformers.GenerationConfig(**options)
    assert torch.equal(lm.generate(ids, mask, generation_config=config), want)


def test_generation_config_fields_are_defaults_and_arguments_override(pair) -> None:
    model, lm = pair
    ids, mask = prompts(2, 8)
    config = transformers.GenerationConfig(
        max_new_tokens=9, repetition_penalty=1.5, use_cache=True, bos_token_id=1, num_beams=1
    )
    want = hf_generate(model, ids, mask, max_new_tokens=5, repetition_penalty=1.5)
    got = lm.generate(ids, mask, generation_config=config, max_new_tokens=5)
    assert torch.equal(got, want)


def test_what_generate_cannot_honour_is_refused_by_name(pair) -> None:
    _, lm = pair
    ids, mask = prompts(2, 8)
    with pytest.raises(torchrefit.InputError, match="num_beams.*num_return_sequences"):
        lm.generate(ids, mask, 4, num_beams=2)  # lists what it takes
    for config, name in [
        (transformers.GenerationConfig(num_beams=2), "num_beams=2"),
        (transformers.GenerationConfig(no_repeat_ngram_size=3), "no_repeat_ngram_size"),
        (transformers.GenerationConfig(return_dict_in_generate=True), "return_dict_in_generate"),
        ({"max_new_tokens": 3}, "not a GenerationConfig"),
    ]:
        with pytest.raises(torchrefit.InputError, match=name):
            lm.generate(ids, mask, 4, generation_config=config)
    with pytest.raises(torchrefit.InputError, match="do_sample=True"):
        lm.generate(ids, mask, 4, num_return_sequences=2)  # greedy: n copies of one row
    with pytest.raises(torchrefit.InputError, match="max_length=8 leaves no new token"):
        lm.generate(ids, mask, max_length=8)
    with pytest.raises(torchrefit.InputError, match="4 prompts x num_return_sequences=2"):
        lm.generate(torch.cat([ids, ids]), None, 4, do_sample=True, num_return_sequences=2)


def test_finished_rows_skip_the_sampling_work(pair, monkeypatch) -> None:
    """Once a check finds rows ended, only the others are sampled; every row ended, the
    loop stops."""
    _, lm = pair
    ids, mask = prompts(3, 9)
    rows: list[int] = []
    sample = Chooser._sample

    def counted(self: Chooser, scores: torch.Tensor) -> torch.Tensor:
        rows.append(scores.shape[0])
        return sample(self, scores)

    monkeypatch.setattr(Chooser, "_sample", counted)
    g = torch.Generator().manual_seed(0)
    free = lm.generate(ids, mask, 30, do_sample=True, generator=g)
    row_0_end = int(free[0, 9 + 2])  # row 0 ends at its third token (and maybe others sooner)
    rows.clear()
    g = torch.Generator().manual_seed(0)
    out = lm.generate(ids, mask, 30, do_sample=True, generator=g, eos_token_id=row_0_end)
    assert rows[:8] == [3] * 8  # every row, until the first check (after step 8)
    assert min(rows) < 3 and rows == sorted(rows, reverse=True)
    ended = (out[:, 9:] == row_0_end).any(dim=1)
    assert ended[0] and (out.shape[1] < 39 or not ended.all())


def teacher_forced(model: torch.nn.Module, out: torch.Tensor, mask: torch.Tensor, prompt: int):
    """log_softmax of an eager forward over the sequences, gathered at each new token,
    with positions from the mask as generate makes them."""
    full = torch.cat([mask, torch.ones_like(out[:, prompt:])], dim=1)
    positions = (full.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(out, attention_mask=full, position_ids=positions).logits.float()
    logprobs = logits[:, prompt - 1 : -1].log_softmax(-1)
    return logprobs.gather(2, out[:, prompt:, None]).squeeze(2)


@pytest.mark.parametrize("sampled", [False, True])
def test_logprobs_equal_a_teacher_forced_forward(pair, sampled: bool) -> None:
    """The raw log-probability of each generated token (before temperature, top-k, top-p
    and the penalty), 0 after a row's EOS, the EOS itself counted."""
    model, lm = pair
    ids, mask = prompts(2, 9)
    count = 3 if sampled else 1
    options: dict[str, Any] = dict(max_new_tokens=14, repetition_penalty=1.2)
    if sampled:
        g = torch.Generator().manual_seed(1)
        options |= dict(do_sample=True, temperature=0.7, top_k=30, top_p=0.95,
                        num_return_sequences=count, generator=g)  # fmt: skip
    free = lm.generate(ids, mask, **options)
    eos = int(free[1, 9 + 3])
    if sampled:
        options["generator"] = torch.Generator().manual_seed(1)
    out = lm.generate(ids, mask, **options, eos_token_id=eos, pad_token_id=0, return_logprobs=True)
    assert isinstance(out, torchrefit.lm.GenerateOutput)
    sequences, logprobs = out.sequences, out.logprobs
    new = sequences.shape[1] - 9
    assert logprobs.dtype == torch.float32 and logprobs.shape == (2 * count, new)
    rows = mask.repeat_interleave(count, dim=0)
    want = teacher_forced(model, sequences, rows, 9)
    is_eos = sequences[:, 9:] == eos
    after = (is_eos.cumsum(1) - is_eos.long()) > 0  # strictly after the first EOS
    assert is_eos.any() and after.any()
    assert torch.equal(logprobs[after], torch.zeros_like(logprobs[after]))
    torch.testing.assert_close(logprobs[~after], want[~after], rtol=1e-4, atol=1e-4)
    assert (logprobs[~after] < 0).all()


def test_logits_take_positions_from_the_mask() -> None:
    """lm(ids, mask) equals the model's forward given the positions generate uses; for a
    model with learned positions, not a plain forward without them."""
    model = gpt2()
    lm = torchrefit.compile_lm(model, max_batch_size=3, max_seq_len=16, backend="eager")
    ids, mask = prompts(3, 9)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    got = lm(ids, mask)
    with torch.no_grad():
        want = model(ids, attention_mask=mask, position_ids=positions).logits
        plain = model(ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(got[2][real[2]], plain[2][real[2]], atol=1e-2)  # 4 pads


# -- every bad input a typed error, before any work ----------------------------------------


def _bad_calls(ids: torch.Tensor, mask: torch.Tensor) -> list[tuple[str, dict[str, Any]]]:
    """(argument named in the error, generate's keywords) of bad calls."""
    nan = mask.float().masked_fill(~mask.bool(), float("nan"))
    return [
        ("input_ids", dict(input_ids=ids.float())),
        ("input_ids", dict(input_ids=ids.to("meta"))),
        ("input_ids", dict(input_ids=ids.to_sparse())),
        ("input_ids", dict(input_ids=ids[:, :0])),
        ("input_ids", dict(input_ids=ids.tolist())),
        ("input_ids", dict(input_ids=ids + VOCAB)),
        ("attention_mask", dict(attention_mask=mask * 2)),
        ("attention_mask", dict(attention_mask=nan)),
        ("attention_mask", dict(attention_mask=mask * 0.5)),
        ("attention_mask", dict(attention_mask=mask.to("meta"))),
        ("attention_mask", dict(attention_mask=mask.to(torch.complex64))),
        ("attention_mask", dict(attention_mask=mask[:, :-1])),
        ("pad_token_id", dict(pad_token_id=VOCAB)),
        ("pad_token_id", dict(pad_token_id=-1)),
        ("pad_token_id", dict(pad_token_id=1.0)),
        ("pad_token_id", dict(pad_token_id="0")),
        ("pad_token_id", dict(pad_token_id=True)),
        ("eos_token_id", dict(eos_token_id=True)),
        ("eos_token_id", dict(eos_token_id=[2, VOCAB])),
        ("eos_token_id", dict(eos_token_id=torch.tensor([[2]]))),
        ("top_k", dict(do_sample=True, top_k=True)),
        ("top_k", dict(do_sample=True, top_k=-1)),
        ("top_p", dict(do_sample=True, top_p=True)),
        ("top_p", dict(do_sample=True, top_p=float("nan"))),
        ("temperature", dict(do_sample=True, temperature=True)),
        ("temperature", dict(do_sample=True, temperature=float("inf"))),
        ("temperature", dict(do_sample=True, temperature=0.0)),
        ("temperature", dict(temperature="hot")),
        ("repetition_penalty", dict(repetition_penalty=0.0)),
        ("repetition_penalty", dict(repetition_penalty=True)),
        ("generator", dict(do_sample=True, generator="cuda")),
        ("generator", dict(generator=0)),
        ("do_sample", dict(do_sample="yes")),
        ("do_sample", dict(do_sample=1)),
        ("max_new_tokens", dict(max_new_tokens=True)),
        ("max_new_tokens", dict(max_new_tokens=2.0)),
        ("max_length", dict(max_length=True)),
        ("min_new_tokens", dict(min_new_tokens=-1)),
        ("num_return_sequences", dict(do_sample=True, num_return_sequences=0)),
        ("num_return_sequences", dict(do_sample=True, num_return_sequences=True)),
        ("return_logprobs", dict(return_logprobs="yes")),
        ("streamer", dict(streamer=object())),
    ]


def test_bad_inputs_are_typed_errors_naming_the_argument_before_any_work(pair) -> None:
    _, lm = pair
    ids, mask = prompts(2, 8)
    lm.generate(ids, mask, 2)
    written = lm.__dict__["_cache_written"]

    def no_work(*_: Any, **__: Any) -> None:
        raise AssertionError("the step ran")

    lm.__dict__["_run"] = no_work
    try:
        for name, kw in _bad_calls(ids, mask):
            call = dict(input_ids=ids, attention_mask=mask, max_new_tokens=4) | kw
            with pytest.raises(torchrefit.InputError, match=name):
                lm.generate(**call)
            if set(kw) <= {"input_ids", "attention_mask"}:
                with pytest.raises(torchrefit.InputError, match=name):
                    lm(call["input_ids"], call["attention_mask"])
    finally:
        del lm.__dict__["_run"]
    assert lm.__dict__["_cache_written"] is written  # nor was the cache touched


def test_a_model_pad_token_outside_the_vocabulary_is_refused() -> None:
    model = gpt2()
    model.generation_config.pad_token_id = VOCAB + 5
    lm = torchrefit.compile_lm(model, max_batch_size=2, max_seq_len=16, backend="eager")
    ids, mask = prompts(2, 6)
    with pytest.raises(torchrefit.InputError, match="pad_token_id"):
        lm.generate(ids, mask, 4)
    assert lm.generate(ids, mask, 4, pad_token_id=0).shape[0] == 2


def test_compile_lm_refuses_positions_beyond_a_learned_position_table() -> None:
    with pytest.raises(torchrefit.SettingsError, match="n_positions"):
        torchrefit.compile_lm(gpt2(), 1, 129, backend="eager")  # GPT-2's table: 128
    lm = torchrefit.compile_lm(llama(), 1, 160, backend="eager")  # rotary: no table
    assert lm.max_seq_len == 160


# -- no output depends on an earlier request -----------------------------------------------


def _huge(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Weights whose attention scores overflow: a request with them writes NaN into the cache."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for key in state:
        if key.endswith(("k_proj.weight", "q_proj.weight")):
            state[key] *= 1e20
    return state


def test_no_output_depends_on_an_earlier_request() -> None:
    """The same request after different ones (longer, shorter, more rows, a model whose
    cache held NaN) gives the same outputs bit for bit, logits at padding positions
    included (a padding query attends to every slot of the cache)."""
    model = llama()
    lm = torchrefit.compile_lm(model, max_batch_size=4, max_seq_len=40, backend="eager")
    ids, mask = prompts(3, 7)
    first_logits = lm(ids, mask)
    first = lm.generate(ids, mask, 9, return_logprobs=True, repetition_penalty=1.1)
    assert first.sequences.shape == (3, 16)
    other_ids, other_mask = prompts(4, 12, seed=9)
    earlier: list[Callable[[], Any]] = [
        lambda: lm.generate(other_ids, other_mask, 28),
        lambda: lm(other_ids[:, :3], None),
        lambda: lm(other_ids, other_mask),
        lambda: lm.generate(other_ids[:2], other_mask[:2], 20, do_sample=True),
    ]
    for request in earlier:
        request()
        assert torch.equal(lm(ids, mask), first_logits)
        again = lm.generate(ids, mask, 9, return_logprobs=True, repetition_penalty=1.1)
        assert torch.equal(again.sequences, first.sequences)
        assert torch.equal(again.logprobs, first.logprobs)
    torchrefit.refit_module_weights(lm, _huge(model), in_place=True)
    poisoned = lm.generate(other_ids, other_mask, 28, return_logprobs=True)
    assert poisoned.logprobs.isnan().any()  # the cache now holds NaN
    torchrefit.refit_module_weights(lm, model.state_dict(), in_place=True)
    assert torch.equal(lm(ids, mask), first_logits)
    assert torch.equal(lm.generate(ids, mask, 9, return_logprobs=True,
                                   repetition_penalty=1.1).logprobs, first.logprobs)  # fmt: skip


def test_a_double_buffered_lm_keeps_requests_apart_across_flips() -> None:
    model = llama()
    lm = torchrefit.compile_lm(model, 4, 40, backend="eager", double_buffer=True)
    ids, mask = prompts(3, 7)
    first = lm(ids, mask)
    other_ids, other_mask = prompts(4, 12, seed=9)
    for weights in (_huge(model), model.state_dict(), model.state_dict()):
        lm.generate(other_ids, other_mask, 28)
        torchrefit.refit_module_weights(lm, weights, in_place=True)  # flips the banks
    assert torch.equal(lm(ids, mask), first)


def test_mutable_module_generate_takes_the_new_options() -> None:
    model = llama()
    mutable = torchrefit.MutableModule(model, backend="eager")
    ids, mask = prompts(2, 7)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # compiled: no fallback warning
        out = mutable.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=True,
                               num_return_sequences=3, return_logprobs=True,
                               generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert out.sequences.shape == (6, 13) and out.logprobs.shape == (6, 6)
    assert mutable.compiles == 1
    with pytest.warns(UserWarning, match="num_beams"):  # what it cannot compile runs eagerly
        config = transformers.GenerationConfig(num_beams=2)
        beams = mutable.generate(
            ids, attention_mask=mask, max_new_tokens=3, generation_config=config
        )
    assert beams.shape == (2, 10) and mutable.compiles == 1
    with pytest.raises(torchrefit.InputError, match="top_k"):
        mutable.generate(ids, attention_mask=mask, do_sample=True, top_k=True)


@pytest.mark.gpu
@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_cuda_graph_decode_with_the_rl_options(family: str) -> None:
    """On CUDA, with decode replayed as CUDA graphs: greedy tokens with a repetition penalty
    and rows ending apart equal transformers'; sampled rows (prompt-major, several per
    prompt) with log-probabilities equal to a teacher-forced forward; no graph is captured
    for more than the decode shape of each batch size."""
    model = BUILDERS[family]().cuda()
    lm = torchrefit.compile_lm(model, max_batch_size=6, max_seq_len=48)
    assert lm.settings.cuda_graphs
    ids, mask = prompts(3, 9)
    ids, mask = torch.where(mask.bool(), ids, ids[:, -1:]).cuda(), mask.cuda()  # see above
    free = lm.generate(ids, mask, 16)
    eos = sorted({int(free[0, 11]), int(free[2, 15])})
    options = dict(max_new_tokens=16, repetition_penalty=1.3, eos_token_id=eos, pad_token_id=0)
    want = hf_generate(model, ids, mask, do_sample=False, **options)
    assert torch.equal(lm.generate(ids, mask, **options), want)
    g = torch.Generator("cuda").manual_seed(0)
    out = lm.generate(ids[:2], mask[:2], 20, do_sample=True, num_return_sequences=3, top_p=0.9,
                      eos_token_id=eos, pad_token_id=0, generator=g,
                      return_logprobs=True)  # fmt: skip
    rows = mask[:2].repeat_interleave(3, dim=0)
    want_lp = teacher_forced(model, out.sequences, rows, 9)
    is_eos = out.sequences[:, 9:] == eos[0]
    for e in eos[1:]:
        is_eos |= out.sequences[:, 9:] == e
    before = (is_eos.cumsum(1) - is_eos.long()) == 0
    torch.testing.assert_close(out.logprobs[before], want_lp[before], rtol=1e-3, atol=1e-3)
    graphs = lm.__dict__.get("_cuda_graphs", {})
    shapes = {key[0][0] for g in graphs.values() for key in g.captured}
    assert shapes <= {(3, 1), (6, 1)}  # decode steps only, one per batch size
