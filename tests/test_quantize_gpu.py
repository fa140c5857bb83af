"""Quantized engines on CUDA: the Triton kernels against the definition, Inductor engines
against eager with fake-quantized weights, CUDA-graph decode with batch-1 variants, refits
(a Refitter captured as CUDA graphs re-quantizing bf16 device tensors) between and during
generations. Skipped without CUDA."""

from __future__ import annotations

import threading

import pytest
import torch
from test_quantize import (
    fake_quantized,
    kernel_trials,
    linear_weights,
    llama,
    quantized_checkpoint,
    quantized_keys,
    reference_generate,
)

import torchrefit
from torchrefit.quantize import FORMATS, kernels, reference

from helpers import assert_matches

pytestmark = pytest.mark.gpu
FMTS = ("fp8", "int8")


def test_kernels_on_cuda_are_the_definition() -> None:
    """The quantize kernel bit-identical to the definition run by CUDA PyTorch; the matrix
    kernel within bf16/fp16 rounding of dequantize-then-mm."""
    w = torch.randn(64, 2048, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(32, 2048, device="cuda", dtype=torch.bfloat16)
    assert kernels.quantize_kernel_works(w)
    assert kernels.mm_kernel_works(x, reference(w, "fp8")[0])
    kernel_trials("cuda")


def _bit_identical_to_reference(module: torchrefit.CompiledModule, model: torch.nn.Module) -> None:
    """Every quantized constant equals the definition of its source, computed on CUDA."""
    store, fmt = module._torchrefit.store, module.settings.quantize
    params = dict(model.named_parameters(remove_duplicate=False))
    columns = linear_weights(model)
    for key, fqn in quantized_keys(module).items():
        q, s = reference(params[fqn].detach(), fmt, columns[fqn])
        assert torch.equal(store[key].view(torch.uint8), q.view(torch.uint8)), key
        scale = key.replace(f"~{fmt}:", f"~{fmt}_scale:")
        assert torch.equal(store[scale], s), scale


@pytest.mark.parametrize("fmt", FMTS)
def test_bf16_engine_equals_eager_with_fake_quantized_weights(fmt: str) -> None:
    model = llama().cuda().to(torch.bfloat16)
    ids = torch.randint(3, 256, (3, 17), device="cuda")
    module = torchrefit.compile(model, (ids,), {"use_cache": False}, quantize=fmt)
    _bit_identical_to_reference(module, model)
    with torch.no_grad():
        want = fake_quantized(model, fmt)(ids, use_cache=False).logits
    assert_matches(module(ids, use_cache=False).logits, want)
    trainer = llama(seed=4).cuda().to(torch.bfloat16)
    refit = torchrefit.Refitter(module, trainer)  # bf16 device tensors, CUDA graphs
    refit()
    _bit_identical_to_reference(module, trainer)
    with torch.no_grad():
        want = fake_quantized(trainer, fmt)(ids, use_cache=False).logits
    assert_matches(module(ids, use_cache=False).logits, want)
    with torch.no_grad():
        trainer.model.layers[1].mlp.up_proj.weight[3, 5] = float("nan")
    with pytest.raises(torchrefit.WeightValueError, match="up_proj"):
        refit()
    assert_matches(module(ids, use_cache=False).logits, want)  # nothing written


@pytest.mark.parametrize("fmt", FMTS)
def test_cuda_graph_decode_equals_transformers_and_follows_refits(fmt: str) -> None:
    """float32 on CUDA: batch-1 decode runs its exact-shape variant (the dequantization in a
    reduction), batch 3 the general engine; greedy tokens equal transformers' on the
    fake-quantized model, before and after a Refitter refit and a quantized checkpoint."""
    model = llama().cuda()
    lm = torchrefit.compile_lm(model, max_batch_size=3, max_seq_len=48, quantize=fmt)
    assert lm.settings.cuda_graphs
    (engine,) = lm.engines().values()
    assert len(engine.variants) == 1  # batch 1
    trainer = llama(seed=3).cuda()
    refit = torchrefit.Refitter(lm, trainer)
    g = torch.Generator().manual_seed(2)
    for batch in (1, 3):
        ids = torch.randint(3, 256, (batch, 11), generator=g).cuda()
        mask = torch.ones_like(ids)
        got = lm.generate(ids, attention_mask=mask, max_new_tokens=16)
        fake = fake_quantized(model, fmt)
        assert torch.equal(got, reference_generate(fake, ids, mask, max_new_tokens=16))
        refit()
        got = lm.generate(ids, attention_mask=mask, max_new_tokens=16)
        fake = fake_quantized(trainer, fmt)
        assert torch.equal(got, reference_generate(fake, ids, mask, max_new_tokens=16))
        torchrefit.refit_module_weights(lm, quantized_checkpoint(model, fmt), in_place=True)
        got = lm.generate(ids, attention_mask=mask, max_new_tokens=16)
        fake = fake_quantized(model, fmt)
        assert torch.equal(got, reference_generate(fake, ids, mask, max_new_tokens=16))


def test_refits_during_generation_wait_and_take_effect_after() -> None:
    """A Refitter called while a generation runs waits for it: that generation is the old
    model's tokens, the next one the new model's (one weight set per generation)."""
    model, trainer = llama().cuda(), llama(seed=6).cuda()
    lm = torchrefit.compile_lm(model, max_batch_size=2, max_seq_len=80, quantize="fp8")
    refit = torchrefit.Refitter(lm, trainer)
    ids = torch.randint(3, 256, (2, 9), device="cuda")
    mask = torch.ones_like(ids)
    old = reference_generate(fake_quantized(model, "fp8"), ids, mask, max_new_tokens=48)
    new = reference_generate(fake_quantized(trainer, "fp8"), ids, mask, max_new_tokens=48)
    lm.generate(ids, attention_mask=mask, max_new_tokens=2)  # graphs captured
    results: list[torch.Tensor] = []
    started = threading.Event()

    def generate() -> None:
        started.set()
        results.append(lm.generate(ids, attention_mask=mask, max_new_tokens=48))

    thread = threading.Thread(target=generate)
    thread.start()
    started.wait()
    refit()
    thread.join()
    assert torch.equal(results[0], old) or torch.equal(results[0], new)
    assert torch.equal(lm.generate(ids, attention_mask=mask, max_new_tokens=48), new)


@pytest.mark.parametrize("fmt", FMTS)
def test_bf16_decode_variant_and_saved_file(fmt: str, tmp_path) -> None:
    """bf16 compile_lm: prefill logits within bf16 rounding of eager on the fake-quantized
    model; a saved file holds 1-byte weights and loads to the same tokens."""
    model = llama(tied=True).cuda().to(torch.bfloat16)
    lm = torchrefit.compile_lm(model, max_batch_size=2, max_seq_len=48, quantize=fmt)
    ids = torch.randint(3, 256, (2, 12), device="cuda")
    with torch.no_grad():
        want = fake_quantized(model, fmt)(ids).logits
    assert_matches(lm(ids), want)
    got = lm.generate(ids[:1], max_new_tokens=8)
    path = str(tmp_path / "lm.trf")
    torchrefit.save(lm, path)
    loaded = torchrefit.load(path)
    assert torch.equal(loaded.generate(ids[:1], max_new_tokens=8), got)
    dtypes = {t.dtype for k, t in loaded._torchrefit.store.tensors.items() if k.startswith("~")}
    assert FORMATS[fmt][0] in dtypes
