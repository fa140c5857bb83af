"""A base-model engine refitted from a peft model (issue 20): `Refitter(compiled_base,
peft_model)` and `refit_module_weights(compiled_base, peft_model)` merge `W + scale * B @ A`
as peft does, for the adapted layers only, so an RL loop that trains a LoRA keeps a merged,
full-speed engine. Compared with eager peft (its forward, and merge_adapter on a copy)."""

from __future__ import annotations

import copy

import pytest
import torch
from test_refitter_binding import _python_calls
from torch import nn

import torchrefit
from torchrefit.refit.verify import tolerance

from helpers import assert_differs, assert_matches, run_eager

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


def _llama(layers: int = 2, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        use_cache=False,
    )
    return transformers.LlamaForCausalLM(config).eval()


def _lora(seed: int, targets: list[str], r: int = 4, alpha: int = 8) -> peft.LoraConfig:
    torch.manual_seed(seed)  # init_lora_weights=False: random B, so every delta is nonzero
    return peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights=False)


def _peft(base: nn.Module, targets: list[str], seed: int = 1) -> nn.Module:
    return peft.get_peft_model(copy.deepcopy(base), _lora(seed, targets), adapter_name="one")


def _train(model: nn.Module, ids: torch.Tensor, steps: int = 2) -> None:
    """SGD on the LoRA factors (peft froze the base), in place, as a trainer does."""
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    for _ in range(steps):
        optimizer.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()


def _merged_copy(model: nn.Module) -> nn.Module:
    """peft's own merge of the adapters in effect, on a copy."""
    merged = copy.deepcopy(model)
    merged.merge_adapter()
    return merged


def _ids() -> torch.Tensor:
    return torch.randint(0, 96, (2, 7))


def _logits(module: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return module(ids).logits


@pytest.fixture(scope="module")
def llama() -> tuple[nn.Module, torchrefit.CompiledModule]:
    base = _llama()
    return base, torchrefit.compile(base, (_ids(),), backend="eager")


def _fresh(llama) -> torchrefit.CompiledModule:
    return copy.deepcopy(llama[1])


def test_a_refitter_keeps_a_base_engine_merged_through_training_steps(llama) -> None:
    base, compiled = llama[0], _fresh(llama)
    model = _peft(base, ["q_proj", "v_proj"])
    refitter = torchrefit.Refitter(compiled, model)
    for _ in range(3):  # RL: train the LoRA, push the adapted layers, generate
        _train(model, _ids())
        refitter()
        ids = _ids()
        assert_matches(_logits(compiled, ids), _logits(model.eval(), ids))
        assert_matches(_logits(compiled, ids), _logits(_merged_copy(model), ids))
    assert_differs(_logits(compiled, ids), _logits(base, ids))


def test_only_the_adapted_constants_are_written(llama) -> None:
    """The engine's other constants are never written: compiled from base A, refitted from
    a LoRA over base B, they keep A's values bit for bit; the adapted ones get B merged."""
    other = _llama(seed=5)
    compiled = _fresh(llama)
    before = {k: t.clone() for k, t in compiled._torchrefit.store.tensors.items()}
    pointers = {k: t.data_ptr() for k, t in compiled._torchrefit.store.tensors.items()}
    model = _peft(other, ["q_proj", "v_proj"])
    refitter = torchrefit.Refitter(compiled, model)
    adapted = {k for k in refitter.tensors}
    assert adapted == {
        f"model.layers.{i}.self_attn.{p}.weight" for i in range(2) for p in ("q_proj", "v_proj")
    }
    refitter()
    merged = _merged_copy(model).base_model.model.state_dict()
    store = compiled._torchrefit.store.tensors
    for key, value in before.items():
        assert store[key].data_ptr() == pointers[key]
        if key in adapted:
            peft_key = key.replace(".weight", ".base_layer.weight")
            assert torch.allclose(store[key], merged[peft_key], atol=1e-6), key
            assert not torch.equal(store[key], value)
        else:
            assert torch.equal(store[key], value), key


def test_several_active_adapters_and_scale_changes(llama) -> None:
    base, compiled = llama[0], _fresh(llama)
    model = _peft(base, ["q_proj", "v_proj", "o_proj"])
    model.add_adapter("two", _lora(2, ["q_proj", "o_proj", "down_proj"], r=2, alpha=3))
    model.base_model.set_adapter(["one", "two"])  # both in effect: their deltas add
    refitter = torchrefit.Refitter(compiled, model)
    refitter()
    ids = _ids()
    assert_matches(_logits(compiled, ids), _logits(model, ids))
    for module in model.modules():
        if isinstance(module, peft.tuners.lora.LoraLayer):
            if "one" in module.scaling:
                module.set_scale("one", 0.25)
            if "two" in module.scaling:
                module.scaling["two"] = -3.0  # any number, set directly
    _train(model, ids, steps=1)
    refitter()
    ids = _ids()
    assert_matches(_logits(compiled, ids), _logits(model.eval(), ids))
    assert_matches(_logits(compiled, ids), _logits(_merged_copy(model), ids))


def test_a_change_of_the_adapters_in_effect_needs_a_new_refitter(llama) -> None:
    base, compiled = llama[0], _fresh(llama)
    model = _peft(base, ["q_proj", "v_proj"])
    model.add_adapter("two", _lora(2, ["q_proj", "v_proj"]))
    refitter = torchrefit.Refitter(compiled, model)
    refitter()
    before = _logits(compiled, ids := _ids())
    model.set_adapter("two")
    with pytest.raises(torchrefit.TorchRefitError, match=r"q_proj.*new Refitter"):
        refitter()
    assert torch.equal(_logits(compiled, ids), before)
    torchrefit.Refitter(compiled, model)()
    assert_matches(_logits(compiled, ids), _logits(model, ids))
    model.merge_adapter()  # merged into the base weight: W as it now is
    torchrefit.Refitter(compiled, model)()
    assert_matches(_logits(compiled, ids), _logits(model, ids))
    with model.disable_adapter():  # peft unmerges: the base model again
        torchrefit.Refitter(compiled, model)()
        assert_matches(_logits(compiled, ids), _logits(base, ids))


def test_refit_module_weights_merges_a_peft_model(llama) -> None:
    base, compiled = llama
    model = _peft(base, ["q_proj", "k_proj", "gate_proj"])
    _train(model, _ids())
    model.eval()
    ids = _ids()
    refitted = torchrefit.refit_module_weights(
        compiled, model, arg_inputs=(ids,), verify_output=True
    )
    assert_matches(_logits(refitted, ids), _logits(model, ids))
    assert_differs(_logits(compiled, ids), _logits(model, ids))  # in_place=False: a copy


def test_a_gpt2_conv1d_lora_with_fan_in_fan_out_and_an_embedding_lora() -> None:
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=2, n_head=2, n_embd=32, vocab_size=96, n_positions=32, use_cache=False
    )
    base = transformers.GPT2LMHeadModel(config).eval()
    ids = _ids()
    compiled = torchrefit.compile(base, (ids,), backend="eager")
    torch.manual_seed(3)
    lora = peft.LoraConfig(
        r=4, target_modules=["c_attn", "wpe"], fan_in_fan_out=True, init_lora_weights=False
    )
    model = peft.get_peft_model(copy.deepcopy(base), lora)
    refitter = torchrefit.Refitter(compiled, model)
    assert "transformer.wpe.weight" in refitter.tensors
    for _ in range(2):
        _train(model, ids, steps=1)
        refitter()
        ids = _ids()
        assert_matches(_logits(compiled, ids), _logits(model.eval(), ids))
        assert_matches(_logits(compiled, ids), _logits(_merged_copy(model), ids))


def test_a_nan_in_a_factor_is_refused_and_nothing_is_written(llama) -> None:
    base, compiled = llama[0], _fresh(llama)
    model = _peft(base, ["q_proj"])
    refitter = torchrefit.Refitter(compiled, model)
    refitter()
    before = _logits(compiled, ids := _ids())
    with torch.no_grad():
        model.base_model.model.model.layers[1].self_attn.q_proj.lora_B["one"].weight[0, 0] = float(
            "nan"
        )
    with pytest.raises(torchrefit.WeightValueError, match=r"layers\.1\.self_attn\.q_proj"):
        refitter()
    assert torch.equal(_logits(compiled, ids), before)


def test_a_replaced_factor_is_refused(llama) -> None:
    base, compiled = llama[0], _fresh(llama)
    model = _peft(base, ["q_proj"])
    refitter = torchrefit.Refitter(compiled, model)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    layer.lora_A["one"].weight = nn.Parameter(torch.randn(4, 32))
    with pytest.raises(torchrefit.TorchRefitError, match=r"lora_A\.one\.weight.*replaced"):
        refitter()


def test_peft_layers_it_cannot_merge_are_refused_by_name(llama) -> None:
    base, compiled = llama[0], _fresh(llama)
    torch.manual_seed(0)
    dora = peft.get_peft_model(
        copy.deepcopy(base), peft.LoraConfig(r=2, target_modules=["q_proj"], use_dora=True)
    )
    with pytest.raises(torchrefit.TorchRefitError, match=r"q_proj.*DoRA"):
        torchrefit.Refitter(compiled, dora)
    saved = peft.get_peft_model(
        copy.deepcopy(base),
        peft.LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]),
    )
    with pytest.raises(torchrefit.TorchRefitError, match=r"lm_head.*modules_to_save"):
        torchrefit.refit_module_weights(compiled, saved)


def test_an_engine_of_the_peft_model_itself_binds_it_plainly() -> None:
    """Compiled from the LoRA model (its layers in the graph), the peft model is bound as it
    is, with the peft wrapper's prefix mapped: nothing is merged."""
    model = _peft(_llama(), ["q_proj", "v_proj"])
    inner = model.base_model.model
    ids = _ids()
    compiled = torchrefit.compile(inner, (ids,), backend="eager")
    refitter = torchrefit.Refitter(
        compiled, model, name_map=lambda n: n.removeprefix("base_model.model.")
    )
    assert "model.layers.0.self_attn.q_proj.lora_A.one.weight" in refitter.tensors
    _train(model, ids)
    refitter()
    assert_matches(_logits(compiled, ids), _logits(model.eval(), ids))


def test_a_peft_refitter_does_python_work_independent_of_the_layer_count() -> None:
    counts = {}
    for layers in (2, 6):
        base = _llama(layers)
        ids = _ids()
        compiled = torchrefit.compile(base, (ids,), backend="eager")
        model = _peft(base, ["q_proj", "v_proj", "up_proj"])
        refitter = torchrefit.Refitter(compiled, model)
        refitter()
        refitter()
        counts[layers] = _python_calls(refitter)
        assert_matches(_logits(compiled, ids), run_eager(model, ids).logits)
    assert counts[6] == counts[2], counts


@pytest.mark.gpu
def test_a_peft_refitter_on_cuda_replays_the_merge_as_a_graph() -> None:
    base = _llama().cuda().to(torch.bfloat16)
    ids = _ids().cuda()
    compiled = torchrefit.compile(base, (ids,))
    model = _peft(base, ["q_proj", "v_proj", "down_proj"])
    refitter = torchrefit.Refitter(compiled, model)
    assert refitter._merge is not None and refitter._merge.graph is not None
    for _ in range(3):
        _train(model, ids, steps=1)
        refitter()
        assert_matches(_logits(compiled, ids), _logits(model.eval(), ids))
    for module in model.modules():
        if isinstance(module, peft.tuners.lora.LoraLayer):
            module.set_scale("one", 0.5)
    refitter()
    assert_matches(_logits(compiled, ids), _logits(model, ids))


def test_the_lora_trainer_example_stays_merged() -> None:
    from test_lora_flows import _example

    errors = _example("lora_trainer").main(quiet=True, steps=2, hidden=64)
    assert len(errors) == 2 and all(e <= tolerance(torch.float32, torch.float32) for e in errors)


def test_a_bf16_engine_merges_float32_factors_rounding_once() -> None:
    """peft keeps a bf16 model's LoRA factors in float32 (autocast_adapter_dtype): the merge
    computes in float32 and rounds the merged weight once, into the engine's bf16."""
    base = _llama().to(torch.bfloat16)
    ids = _ids()
    compiled = torchrefit.compile(base, (ids,), backend="eager")
    model = _peft(base, ["q_proj", "v_proj"])
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.lora_A["one"].weight.dtype == torch.float32
    _train(model, ids, steps=1)
    refitter = torchrefit.Refitter(compiled, model)
    refitter()
    store = compiled._torchrefit.store.tensors
    weight = layer.base_layer.weight.float() + layer.get_delta_weight("one").float()
    merged = store["model.layers.0.self_attn.q_proj.weight"].float()
    torch.testing.assert_close(merged, weight, rtol=2**-8, atol=0)  # within one rounding
    assert_matches(_logits(compiled, ids), _logits(model.eval(), ids))
