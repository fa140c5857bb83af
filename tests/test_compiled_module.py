"""A compiled module as Python treats modules (issue 20's rough edges): copy.deepcopy gives
its own weights; pickling (torch.save) and state_dict()/load_state_dict() raise naming what
to call; it shows as a torchrefit type; and weights of another architecture are described
as such, not as a naming problem."""

from __future__ import annotations

import copy
import io
import pickle
import threading

import pytest
import torch
from torch import nn

import torchrefit

from helpers import assert_differs, assert_matches, run_eager
from models import MLP, bert, randomize


@pytest.fixture(scope="module")
def mlp() -> tuple[nn.Module, torchrefit.CompiledModule]:
    model = randomize(MLP(), 0)
    return model, torchrefit.compile(model, (torch.randn(4, 16),), backend="eager")


# -- copies ---------------------------------------------------------------------------------


def test_deepcopy_gives_a_module_with_its_own_weights_sharing_the_engines(mlp) -> None:
    a, compiled = mlp
    x = torch.randn(4, 16)
    twin = copy.deepcopy(compiled)
    assert type(twin) is not type(compiled) and isinstance(twin, torchrefit.CompiledModule)
    assert_matches(twin(x), run_eager(a, x))
    mine, theirs = twin._torchrefit, compiled._torchrefit
    assert mine.store is not theirs.store and mine.guard is not theirs.guard
    assert all(mine.store[k].data_ptr() != theirs.store[k].data_ptr() for k in theirs.store.keys())
    engines = zip(twin.engines().values(), compiled.engines().values(), strict=True)
    assert all(e.runner is f.runner for e, f in engines)  # the compiled code is shared
    b = randomize(MLP(), 1)
    torchrefit.refit_module_weights(twin, b, in_place=True)
    assert_matches(twin(x), run_eager(b, x))
    assert_matches(compiled(x), run_eager(a, x))  # the original kept its weights
    assert_matches(copy.copy(compiled)(x), run_eager(a, x))
    held = [compiled]
    assert copy.deepcopy(held)[0] is not compiled  # inside containers too


def test_a_copy_is_taken_while_no_refit_writes(mlp) -> None:
    a, compiled = mlp
    twin = copy.deepcopy(compiled)
    b = randomize(MLP(), 1)
    state = twin._torchrefit
    copied: list[torchrefit.CompiledModule] = []
    with state.guard.writing(state.store.device):  # a commit in progress
        thread = threading.Thread(target=lambda: copied.append(copy.deepcopy(twin)))
        thread.start()
        thread.join(0.2)
        assert thread.is_alive()  # waits for the write to end
        torchrefit.refit_module_weights(twin, b.state_dict(), in_place=False)  # no deadlock
    thread.join()
    x = torch.randn(4, 16)
    assert_matches(copied[0](x), run_eager(a, x))


def test_a_deepcopy_of_a_module_loaded_without_weights_stays_unloaded(mlp, tmp_path) -> None:
    _, compiled = mlp
    torchrefit.save(compiled, str(tmp_path / "m.trf"), include_weights=False)
    loaded = torchrefit.load(str(tmp_path / "m.trf"))
    with pytest.raises(torchrefit.WeightsNotLoadedError):
        copy.deepcopy(loaded)(torch.randn(4, 16))


# -- what is refused, by name ---------------------------------------------------------------


def test_pickling_raises_naming_torchrefit_save(mlp) -> None:
    _, compiled = mlp
    for save in (lambda: torch.save(compiled, io.BytesIO()), lambda: pickle.dumps(compiled)):
        with pytest.raises(torchrefit.SerializationError, match=r"torchrefit\.save"):
            save()


def test_state_dict_and_load_state_dict_raise_naming_what_to_call(mlp) -> None:
    a, compiled = mlp
    with pytest.raises(torchrefit.SerializationError, match=r"torchrefit\.save"):
        compiled.state_dict()
    with pytest.raises(torchrefit.SerializationError, match="refit_module_weights"):
        compiled.load_state_dict(randomize(MLP(), 1).state_dict())
    x = torch.randn(4, 16)
    assert_matches(compiled(x), run_eager(a, x))  # nothing was loaded


# -- a torchrefit type ----------------------------------------------------------------------


def test_a_compiled_module_shows_as_a_torchrefit_type(mlp, tmp_path) -> None:
    _, compiled = mlp
    refitted = torchrefit.refit_module_weights(compiled, randomize(MLP(), 1))
    torchrefit.save(compiled, str(tmp_path / "m.trf"))
    loaded = torchrefit.load(str(tmp_path / "m.trf"))
    for module in (compiled, refitted, loaded, copy.deepcopy(compiled)):
        assert type(module).__name__ == "CompiledModule"
        assert repr(module).startswith("CompiledModule(")
        assert isinstance(module, torchrefit.CompiledModule)
        assert isinstance(module, torch.fx.GraphModule)
        assert "def forward" in module.code  # GraphModule behaviour intact
    assert len({type(m) for m in (compiled, refitted, loaded)}) == 3  # torch.fx: one per instance
    compiled.recompile()
    assert type(compiled).__name__ == "CompiledModule"


def test_a_compiled_lm_shows_as_compiled_lm_and_copies_as_one() -> None:
    from test_lm import llama

    model = llama()
    lm = torchrefit.compile_lm(model, max_batch_size=3, max_seq_len=16, backend="eager")
    assert type(lm).__name__ == "CompiledLM" and repr(lm).startswith("CompiledLM(")
    twin = copy.deepcopy(lm)
    assert type(twin).__name__ == "CompiledLM" and isinstance(twin, torchrefit.CompiledLM)
    ids = torch.randint(0, model.config.vocab_size, (1, 5))
    assert torch.equal(twin.generate(ids, max_new_tokens=4), lm.generate(ids, max_new_tokens=4))


# -- another architecture, described as one -------------------------------------------------


def _bert(layers: int, hidden: int = 32, seed: int = 0) -> nn.Module:
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=64,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=48,
        max_position_embeddings=32,
    )
    return randomize(BertModel(config), seed)


@pytest.fixture(scope="module")
def bert2() -> torchrefit.CompiledModule:
    return torchrefit.compile(bert(0), (torch.randint(0, 64, (2, 8)),), backend="eager")


@pytest.mark.parametrize("form", ["module", "state_dict"])
def test_a_deeper_model_is_another_architecture_not_other_names(bert2, form) -> None:
    deeper = _bert(4)
    given = deeper if form == "module" else deeper.state_dict()
    with pytest.raises(torchrefit.UnexpectedWeightError) as error:
        torchrefit.refit_module_weights(bert2, given)
    message = str(error.value)
    assert "another architecture" in message and "Rename" not in message
    first = "'encoder.layer.2.attention.self.query.weight': float32[32, 32] in the new weights, "
    assert first + "absent in the compiled model" in message
    extra = [k for k in deeper.state_dict() if k.startswith(("encoder.layer.2", "encoder.layer.3"))]
    assert f"{len(extra)} weight(s) differ" in message
    assert sorted(error.value.unexpected) == sorted(extra) and error.value.missing == []


def test_a_shallower_model_is_another_architecture(bert2) -> None:
    with pytest.raises(torchrefit.MissingWeightError) as error:
        torchrefit.refit_module_weights(bert2, _bert(1))
    message = str(error.value)
    assert "another architecture" in message and "strict=False" in message
    assert "'encoder.layer.1.attention.self.query.weight': absent in the new weights, " in message


def test_a_wider_model_names_the_first_weight_and_how_many_differ(bert2) -> None:
    wider = _bert(2, hidden=64)
    with pytest.raises(torchrefit.WeightShapeError) as error:
        torchrefit.refit_module_weights(bert2, wider)
    message = str(error.value)
    reshaped = [k for k, v in wider.state_dict().items() if v.shape[-1] == 64 or v.shape[0] == 64]
    assert "'embeddings.word_embeddings.weight' has shape [64, 64]" in message
    assert f"{len(reshaped)} weight(s) differ ({len(reshaped)} of another shape)" in message


def test_renamed_weights_are_still_a_naming_problem(bert2) -> None:
    state = {f"bert.{k}": v for k, v in bert(1).state_dict().items()}
    with pytest.raises(torchrefit.UnexpectedWeightError, match=r"removeprefix\('bert\.'\)"):
        torchrefit.refit_module_weights(bert2, state)
    state = {k.replace("attention.self", "attn"): v for k, v in bert(1).state_dict().items()}
    with pytest.raises(torchrefit.UnexpectedWeightError, match="Rename them"):
        torchrefit.refit_module_weights(bert2, state)
    x = torch.randint(0, 64, (2, 8))
    refitted = torchrefit.refit_module_weights(
        bert2, state, name_map=lambda n: n.replace(".attn.", ".attention.self.")
    )
    assert_matches(refitted(x), run_eager(bert(1), x))
    assert_differs(bert2(x), run_eager(bert(1), x))
