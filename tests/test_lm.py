"""compile_lm: greedy tokens equal transformers' generate exactly (float32), refits change
them to the new model's, sampling is reproducible, and bad calls get typed errors."""

from __future__ import annotations

import copy
import threading
import warnings

import pytest
import safetensors.torch
import torch

import torchrefit
from tests.helpers import assert_matches, members_of
from tests.models import LM_VOCAB as VOCAB
from tests.models import generation_gpt2 as gpt2

transformers = pytest.importorskip("transformers")


# what the Llama-family tiny configs share: 2 layers, 4 query heads of 16, random weights
# large enough that greedy decoding says something
_DECODER = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    vocab_size=VOCAB, max_position_embeddings=128, initializer_range=0.3, bos_token_id=1,
    eos_token_id=2,
)  # fmt: skip


def llama(seed: int = 0, tied: bool = False, kv_heads: int = 2) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        num_key_value_heads=kv_heads, tie_word_embeddings=tied, **_DECODER
    )
    return transformers.LlamaForCausalLM(config).eval()


def qwen2(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = transformers.Qwen2Config(num_key_value_heads=1, tie_word_embeddings=True, **_DECODER)
    return transformers.Qwen2ForCausalLM(config).eval()


def mistral(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = transformers.MistralConfig(num_key_value_heads=2, sliding_window=6, **_DECODER)
    return transformers.MistralForCausalLM(config).eval()


FAMILIES = {
    "gpt2-tied": gpt2,
    "llama-gqa": llama,
    "llama-tied-mha": lambda seed=0: llama(seed, tied=True, kv_heads=4),
    "qwen2-mqa-tied": qwen2,
    "mistral-window": mistral,
}


def prompts(batch: int, length: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompts of different lengths (row i loses 2*i tokens to padding)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    for row in range(batch):
        mask[row, : 2 * row] = 0
        ids[row, : 2 * row] = 0
    return ids, mask


def reference(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, **kw) -> torch.Tensor:
    """transformers' greedy generate on a copy (generate sets attributes on the model)."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return copy.deepcopy(model).generate(ids, attention_mask=mask, do_sample=False, **kw)


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("batch", [1, 3])
def test_greedy_tokens_equal_transformers(family: str, batch: int) -> None:
    model = FAMILIES[family]()
    lm = torchrefit.compile_lm(model, max_batch_size=3, max_seq_len=40, backend="eager")
    ids, mask = prompts(batch, 11)
    want = reference(model, ids, mask, max_new_tokens=14)
    got = lm.generate(ids, attention_mask=mask, max_new_tokens=14)
    assert torch.equal(got, want)
    assert len(set(got[0, 11:].tolist())) > 3  # a model that says something


def test_inductor_engines_give_the_same_tokens() -> None:
    model = llama()
    lm = torchrefit.compile_lm(model, max_batch_size=2, max_seq_len=32)
    assert {e.backend for e in lm.engines().values()} == {"inductor"}
    ids, mask = prompts(2, 9)
    want = reference(model, ids, mask, max_new_tokens=12)
    assert torch.equal(lm.generate(ids, attention_mask=mask, max_new_tokens=12), want)


def _count_variant_calls(engine: torch.nn.Module) -> dict[int, int]:
    """Calls of each decode variant, by its batch size (the rows of its attention mask)."""
    calls: dict[int, int] = {}
    for key, variant in engine.variants.items():
        rows = key[1][1][0]
        calls[rows] = 0

        def counted(*xs, run=variant.runner, rows=rows):
            calls[rows] += 1
            return run(*xs)

        variant.runner = counted
    return calls


def test_decode_variants_run_their_steps_and_follow_refits_files_and_the_cache(tmp_path) -> None:
    """Engines compiled for exact decode shapes (batch 1 and 3) run those steps, batch 2 the
    general engine; tokens stay transformers' after a refit, a save and load, a cache hit."""
    model, trainer = llama(), llama(seed=5)
    cache = str(tmp_path / "cache")
    lm = torchrefit.compile_lm(
        model, max_batch_size=3, max_seq_len=32, decode_batch_sizes=[3, 1], cache_dir=cache
    )
    (engine,) = lm.engines().values()
    assert sorted(key[1][1][0] for key in engine.variants) == [1, 3]
    path = str(tmp_path / "lm.trf")
    torchrefit.save(lm, path)
    calls = _count_variant_calls(engine)
    cases = [prompts(batch, 9) for batch in (1, 2, 3)]
    for ids, mask in cases:
        want = reference(model, ids, mask, max_new_tokens=6)
        assert torch.equal(lm.generate(ids, attention_mask=mask, max_new_tokens=6), want)
    assert calls == {1: 5, 3: 5}  # the decode steps of batches 1 and 3, never a prefill
    torchrefit.refit_module_weights(lm, trainer.state_dict(), in_place=True)
    for ids, mask in cases:
        want = reference(trainer, ids, mask, max_new_tokens=6)
        assert torch.equal(lm.generate(ids, attention_mask=mask, max_new_tokens=6), want)
    assert calls == {1: 10, 3: 10}
    hit = torchrefit.compile_lm(
        model, max_batch_size=3, max_seq_len=32, decode_batch_sizes=(1, 3), cache_dir=cache
    )
    for loaded in (torchrefit.load(path), hit):
        (engine,) = loaded.engines().values()
        assert engine.__dict__["source"] is None and len(engine.variants) == 2  # not compiled
        calls = _count_variant_calls(engine)
        for ids, mask in cases:
            want = reference(model, ids, mask, max_new_tokens=6)
            assert torch.equal(loaded.generate(ids, attention_mask=mask, max_new_tokens=6), want)
        assert calls == {1: 5, 3: 5}


def test_a_variant_that_fails_to_compile_leaves_the_general_engine(
    monkeypatch, caplog, tmp_path
) -> None:
    from torchrefit.engine.inductor import InductorBackend

    def fails(self, gm, examples):
        raise RuntimeError("no static kernel today")

    monkeypatch.setattr(InductorBackend, "specialize", fails)
    model = llama()
    with caplog.at_level("WARNING", logger="torchrefit"):
        lm = torchrefit.compile_lm(model, 2, 32, decode_batch_sizes=[1], cache_dir=str(tmp_path))
    assert "no static kernel today" in caplog.text and "general engine" in caplog.text
    assert not list(tmp_path.glob("*.trf"))  # not cached: the variant may compile next time
    (engine,) = lm.engines().values()
    assert not engine.variants
    ids, mask = prompts(1, 7)
    want = reference(model, ids, mask, max_new_tokens=5)
    assert torch.equal(lm.generate(ids, attention_mask=mask, max_new_tokens=5), want)


def test_generation_stops_per_row_at_eos_and_pads_after() -> None:
    model = gpt2()
    lm = torchrefit.compile_lm(model, max_batch_size=3, max_seq_len=40, backend="eager")
    ids, mask = prompts(3, 8)
    free = lm.generate(ids, attention_mask=mask, max_new_tokens=12)
    eos = int(free[1, 8 + 3])  # row 1's fourth new token becomes its end
    want = reference(model, ids, mask, max_new_tokens=12, eos_token_id=eos, pad_token_id=0)
    got = lm.generate(ids, attention_mask=mask, max_new_tokens=12, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(got, want)
    row = got[1, 8:].tolist()
    assert row[row.index(eos) + 1 :] == [0] * (len(row) - row.index(eos) - 1)


def test_all_rows_ending_stops_generation_early() -> None:
    model = gpt2()
    lm = torchrefit.compile_lm(model, max_batch_size=1, max_seq_len=40, backend="eager")
    ids, _ = prompts(1, 6)
    first = int(lm.generate(ids, max_new_tokens=1)[0, -1])
    out = lm.generate(ids, max_new_tokens=20, eos_token_id=first)
    assert out.shape == (1, 7)
    assert torch.equal(out, reference(model, ids, torch.ones_like(ids), max_new_tokens=20,
                                      eos_token_id=first))  # fmt: skip


def test_logits_match_eager_forward() -> None:
    model = llama()
    lm = torchrefit.compile_lm(model, max_batch_size=2, max_seq_len=32, backend="eager")
    ids, mask = prompts(2, 10)
    with torch.no_grad():
        want = model(ids, attention_mask=mask).logits
    got = lm(ids, attention_mask=mask)
    assert got.shape == (2, 10, VOCAB)
    real = mask.bool()  # padded positions are don't-cares in both
    assert_matches(got[real], want[real])


def test_sampling_with_a_seeded_generator_is_reproducible() -> None:
    lm = torchrefit.compile_lm(llama(), max_batch_size=2, max_seq_len=40, backend="eager")
    ids, mask = prompts(2, 8)
    runs = [
        lm.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=16,
            do_sample=True,
            temperature=0.9,
            top_k=50,
            top_p=0.9,
            generator=torch.Generator().manual_seed(seed),
        )  # fmt: skip
        for seed in (7, 7, 8)
    ]
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])
    greedy = lm.generate(ids, attention_mask=mask, max_new_tokens=16)
    assert not torch.equal(runs[0], greedy)
    top1 = lm.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=True, top_k=1)
    assert torch.equal(top1, greedy)  # top-k of 1 is greedy


def test_refits_give_the_new_models_tokens() -> None:
    lm = torchrefit.compile_lm(llama(0), max_batch_size=3, max_seq_len=40, backend="eager")
    ids, mask = prompts(3, 9)
    seen = []
    for seed in (1, 2, 3):  # three refits in a row
        new = llama(seed)
        torchrefit.refit_module_weights(lm, new.state_dict(), in_place=True)
        got = lm.generate(ids, attention_mask=mask, max_new_tokens=10)
        assert torch.equal(got, reference(new, ids, mask, max_new_tokens=10))
        seen.append(got)
    assert not torch.equal(seen[0], seen[1])


def test_refitter_from_a_trainer_model() -> None:
    lm = torchrefit.compile_lm(gpt2(0), max_batch_size=2, max_seq_len=40, backend="eager")
    trainer = gpt2(5)
    refit = torchrefit.Refitter(lm, trainer)
    ids, mask = prompts(2, 7)
    for _ in range(2):
        with torch.no_grad():
            for p in trainer.parameters():
                p.add_(0.05 * torch.randn_like(p))
        refit()
        got = lm.generate(ids, attention_mask=mask, max_new_tokens=10)
        assert torch.equal(got, reference(trainer, ids, mask, max_new_tokens=10))


def test_out_of_place_refit_gives_a_second_lm_with_its_own_cache() -> None:
    lm = torchrefit.compile_lm(llama(0), max_batch_size=2, max_seq_len=32, backend="eager")
    new = llama(4)
    other = torchrefit.refit_module_weights(lm, new.state_dict(), in_place=False)
    assert isinstance(other, torchrefit.CompiledLM) and other is not lm
    ids, mask = prompts(2, 6)
    assert torch.equal(other.generate(ids, mask, 8), reference(new, ids, mask, max_new_tokens=8))
    assert torch.equal(lm.generate(ids, mask, 8), reference(llama(0), ids, mask, max_new_tokens=8))


def test_save_load_and_stripped_files(tmp_path) -> None:
    model = llama(0)
    lm = torchrefit.compile_lm(model, max_batch_size=2, max_seq_len=32, backend="eager")
    ids, mask = prompts(2, 6)
    want = reference(model, ids, mask, max_new_tokens=8)
    lm.generate(ids, mask, 8)  # a used cache is not saved
    path = str(tmp_path / "lm.trf")
    torchrefit.save(lm, path)
    saved = safetensors.torch.load(members_of(tmp_path / "lm.trf")["weights.safetensors"])
    assert not set(lm.info.cache_keys) & set(saved) and "lm_head.weight" in saved
    loaded = torchrefit.load(path)
    assert isinstance(loaded, torchrefit.CompiledLM)
    assert torch.equal(loaded.generate(ids, mask, 8), want)
    stripped = str(tmp_path / "lm-stripped.trf")
    torchrefit.save(lm, stripped, include_weights=False)
    kept = safetensors.torch.load(members_of(tmp_path / "lm-stripped.trf")["weights.safetensors"])
    assert not set(lm.info.cache_keys) & set(kept) and "lm_head.weight" not in kept
    with pytest.raises(torchrefit.WeightsNotLoadedError):
        torchrefit.load(stripped).generate(ids, mask, 8)
    new = llama(9)
    refilled = torchrefit.load(stripped, weights=new.state_dict())
    assert torch.equal(refilled.generate(ids, mask, 8), reference(new, ids, mask, max_new_tokens=8))


def test_a_refit_waits_for_a_running_generation() -> None:
    """One generate runs on one weight set: a refit started meanwhile lands after it."""
    old, new = llama(0), llama(6)
    lm = torchrefit.compile_lm(copy.deepcopy(old), max_batch_size=2, max_seq_len=64,
                               backend="eager")  # fmt: skip
    ids, mask = prompts(2, 8)
    want_old = reference(old, ids, mask, max_new_tokens=40)
    want_new = reference(new, ids, mask, max_new_tokens=40)
    results: list[torch.Tensor] = []
    errors: list[BaseException] = []

    def generate() -> None:
        try:
            for _ in range(3):
                results.append(lm.generate(ids, mask, 40))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    thread = threading.Thread(target=generate)
    thread.start()
    torchrefit.refit_module_weights(lm, new.state_dict(), in_place=True)
    thread.join()
    assert not errors
    assert all(torch.equal(r, want_old) or torch.equal(r, want_new) for r in results)
    assert torch.equal(lm.generate(ids, mask, 40), want_new)


def test_mutable_module_generate_compiles_once_and_refits() -> None:
    model = llama(0)
    mutable = torchrefit.MutableModule(model, backend="eager")
    ids, mask = prompts(2, 7)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        first = mutable.generate(ids, attention_mask=mask, max_new_tokens=9)
    assert torch.equal(first, reference(model, ids, mask, max_new_tokens=9))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.2)
    second = mutable.generate(ids, attention_mask=mask, max_new_tokens=9)
    assert torch.equal(second, reference(model, ids, mask, max_new_tokens=9))
    assert not torch.equal(first, second)
    assert (mutable.compiles, mutable.refits) == (1, 1)
    mutable.generate(ids[:1], max_new_tokens=5)  # a smaller call fits the same cache
    assert mutable.compiles == 1


def test_mutable_module_generate_options_it_cannot_run_warn_once() -> None:
    model = gpt2()
    mutable = torchrefit.MutableModule(model, backend="eager")
    ids, _ = prompts(1, 5)
    with pytest.warns(UserWarning, match="uncompiled"):
        out = mutable.generate(ids, max_new_tokens=4, num_beams=2)
    assert out.shape == (1, 9)
    assert mutable.compiles == 0


def test_bad_calls_are_typed_errors() -> None:
    for sizes in [(0,), (3,), "1", (1.0,)]:
        with pytest.raises(torchrefit.SettingsError, match="decode_batch_sizes"):
            torchrefit.compile_lm(gpt2(), 2, 16, decode_batch_sizes=sizes, backend="eager")
    lm = torchrefit.compile_lm(gpt2(), max_batch_size=2, max_seq_len=16, backend="eager")
    ids, mask = prompts(2, 6)
    with pytest.raises(torchrefit.InputError, match="max_batch_size"):
        lm.generate(torch.cat([ids, ids]), max_new_tokens=2)
    with pytest.raises(torchrefit.InputError, match="max_seq_len"):
        lm.generate(ids, mask, max_new_tokens=11)
    right = mask.flip(1)
    with pytest.raises(torchrefit.InputError, match="left"):
        lm.generate(ids, right, max_new_tokens=2)
    with pytest.raises(torchrefit.InputError, match="vocabulary"):
        lm.generate(ids + VOCAB, max_new_tokens=2)
    with pytest.raises(torchrefit.InputError, match="batch"):
        lm.generate(ids[0], max_new_tokens=2)
    with pytest.raises(torchrefit.InputError, match="top_p"):
        lm.generate(ids, max_new_tokens=2, do_sample=True, top_p=1.5)
    with pytest.raises(torchrefit.InputError, match="max_new_tokens"):
        lm.generate(ids, max_new_tokens=0)


def test_models_compile_lm_cannot_take_are_refused_with_the_fix() -> None:
    with pytest.raises(torchrefit.UnsupportedGraphError, match="eval"):
        torchrefit.compile_lm(gpt2().train(), 1, 16)
    with pytest.raises(torchrefit.UnsupportedGraphError, match="torchrefit.compile"):
        torchrefit.compile_lm(torch.nn.Linear(4, 4), 1, 16)
    t5 = transformers.T5ForConditionalGeneration(
        transformers.T5Config(d_model=32, d_ff=64, num_layers=1, num_heads=2, vocab_size=64)
    ).eval()
    with pytest.raises(torchrefit.UnsupportedGraphError, match="encoder-decoder"):
        torchrefit.compile_lm(t5, 1, 16)
    with pytest.raises(torchrefit.SettingsError, match="max_seq_len"):
        torchrefit.compile_lm(gpt2(), 1, 0)
    with pytest.raises(torchrefit.SettingsError, match="bfloat16"):
        torchrefit.compile_lm(gpt2(), 1, 16, dtype="bfloat16")


def test_the_dynamic_cache_error_names_compile_lm() -> None:
    model = gpt2()
    with pytest.raises(torchrefit.ExportError, match="compile_lm"):
        torchrefit.compile(model, (torch.randint(0, VOCAB, (1, 5)),), backend="eager")


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["gpt2-tied", "llama-gqa"])
def test_cuda_graph_decode_equals_transformers_and_follows_refits(family: str) -> None:
    """On CUDA, decode replays CUDA graphs (one per batch size); float32 tokens equal
    transformers', before and after a Refitter refit, across batch sizes 1 and 3."""
    model = FAMILIES[family]().cuda()
    lm = torchrefit.compile_lm(model, max_batch_size=3, max_seq_len=48)
    assert lm.settings.cuda_graphs
    trainer = FAMILIES[family](seed=3).cuda()
    refit = torchrefit.Refitter(lm, trainer)
    for batch in (1, 3):
        ids, mask = prompts(batch, 11)
        ids, mask = ids.cuda(), mask.cuda()
        got = lm.generate(ids, attention_mask=mask, max_new_tokens=16)
        assert torch.equal(got, reference(model, ids, mask, max_new_tokens=16))
        refit()
        got = lm.generate(ids, attention_mask=mask, max_new_tokens=16)
        assert torch.equal(got, reference(trainer, ids, mask, max_new_tokens=16))
        torchrefit.refit_module_weights(lm, model.state_dict(), in_place=True)
    graphs = lm.__dict__.get("_cuda_graphs", {})
    assert sum(len(g.captured) for g in graphs.values()) >= 2  # a decode graph per batch size


@pytest.mark.gpu
def test_cuda_bfloat16_logits_match_eager() -> None:
    model = llama().cuda().to(torch.bfloat16)
    lm = torchrefit.compile_lm(model, max_batch_size=2, max_seq_len=32)
    ids, mask = prompts(2, 10)
    ids, mask = ids.cuda(), mask.cuda()
    with torch.no_grad():
        want = model(ids, attention_mask=mask).logits
    got = lm(ids, attention_mask=mask)
    real = mask.bool()
    assert_matches(got[real], want[real])
    with pytest.raises(torchrefit.InputError, match="generator"):  # a CPU generator
        lm.generate(ids, max_new_tokens=2, do_sample=True, generator=torch.Generator())


def test_rl_loop_example_runs(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """examples/rl_loop.py: generate, update, refit, generate; tokens follow the policy."""
    import runpy
    import sys
    from pathlib import Path

    example = Path(__file__).parent.parent / "examples" / "rl_loop.py"
    monkeypatch.setattr(sys, "argv", [str(example), "--rounds", "2"])
    runpy.run_path(str(example), run_name="__main__")
    out = capsys.readouterr().out
    assert out.count("greedy tokens equal the trained policy's: True") == 2


def test_double_buffered_lm_refits_between_generations() -> None:
    lm = torchrefit.compile_lm(llama(0), 2, 32, backend="eager", double_buffer=True)
    ids, mask = prompts(2, 7)
    for seed in (1, 2):
        torchrefit.refit_module_weights(lm, llama(seed).state_dict(), in_place=True)
        assert torch.equal(lm.generate(ids, mask, 8), reference(llama(seed), ids, mask,
                                                              max_new_tokens=8))  # fmt: skip
    torchrefit.Refitter(lm, llama(3))()
    assert torch.equal(lm.generate(ids, mask, 8), reference(llama(3), ids, mask, max_new_tokens=8))


def test_command_line_refit_and_verify_of_a_saved_lm(tmp_path) -> None:
    import subprocess
    import sys

    lm = torchrefit.compile_lm(llama(0), 2, 32, backend="eager")
    torchrefit.save(lm, str(tmp_path / "lm.trf"))
    new = llama(1)
    safetensors.torch.save_file(
        {k: v.contiguous() for k, v in new.state_dict().items()}, str(tmp_path / "new.safetensors")
    )
    result = subprocess.run(
        [sys.executable, "-m", "torchrefit.cli", "refit", str(tmp_path / "lm.trf"),
         str(tmp_path / "new.safetensors"), "-o", str(tmp_path / "out.trf"), "--verify"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "verified" in result.stdout
    out = torchrefit.load(str(tmp_path / "out.trf"))
    ids, mask = prompts(2, 7)
    assert torch.equal(out.generate(ids, mask, 8), reference(new, ids, mask, max_new_tokens=8))
