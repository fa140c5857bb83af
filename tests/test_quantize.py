"""Quantized engines (Settings.quantize): fp8 / int8 linear weights with per-channel scales,
derived constants re-quantized from full precision on every refit.

Outputs equal eager PyTorch with the fake-quantized weights (the definition applied to the
model's weights), refits are exact and repeatable from every door, quantized checkpoints
bind as they are, NaN is refused. GPU-marked tests run the same on CUDA with the Triton
kernels (tests/test_quantize_gpu.py).
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import safetensors.torch
import torch

import torchrefit
from torchrefit.cli.files import inspect_file
from torchrefit.graph_io import graph_from_json, graph_to_json
from torchrefit.quantize import FORMATS, dequantize, reference
from torchrefit.refit.verify import relative_error

from helpers import assert_matches, run_interpreted
from models import LM_VOCAB as VOCAB
from models import MLP
from models import generation_gpt2 as gpt2

transformers = pytest.importorskip("transformers")

FMTS = ("fp8", "int8")


def llama(seed: int = 0, tied: bool = False) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=128,
        initializer_range=0.3, bos_token_id=1, eos_token_id=2, tie_word_embeddings=tied,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config).eval()


def mlp(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return MLP().eval()


MODELS = {"mlp": mlp, "gpt2": gpt2, "llama": llama}


def inputs(name: str) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(7)
    if name == "mlp":
        return (torch.randn(5, 16, generator=g),)
    return (torch.randint(3, VOCAB, (2, 9), generator=g),)


def kwargs(name: str) -> dict:
    return {} if name == "mlp" else {"use_cache": False}


def linear_weights(model: torch.nn.Module) -> dict[str, bool]:
    """FQN -> whether it is used as stored, (in, out) (Conv1D), for every linear layer."""
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            found[f"{name}.weight"] = False
        elif type(module).__name__ == "Conv1D":
            found[f"{name}.weight"] = True
    return found


def fake_quantized(model: torch.nn.Module, fmt: str) -> torch.nn.Module:
    """A copy of `model` whose linear weights are the definition's dequantized values; a
    tied lm head gets its own (the embedding lookup keeps full precision)."""
    fake = copy.deepcopy(model)
    tied = getattr(fake, "get_input_embeddings", lambda: None)()
    with torch.no_grad():
        for fqn, columns in linear_weights(fake).items():
            owner, _, attr = fqn.rpartition(".")
            module = fake.get_submodule(owner)
            weight = getattr(module, attr)
            q, s = reference(weight, fmt, columns)
            value = dequantize(q, s, weight.dtype)
            value = value.t().contiguous() if columns else value
            if tied is not None and weight is tied.weight:
                setattr(module, attr, torch.nn.Parameter(value))
            else:
                weight.copy_(value)
    return fake


def run(model: torch.nn.Module, name: str, x: tuple[torch.Tensor, ...]) -> torch.Tensor:
    with torch.no_grad():
        out = model(*x, **kwargs(name))
    return out if isinstance(out, torch.Tensor) else out.logits


def compiled(name: str, fmt: str | None, seed: int = 0, **settings) -> tuple:
    model = MODELS[name](seed)
    x = inputs(name)
    module = torchrefit.compile(
        model, x, kwargs(name), backend=settings.pop("backend", "eager"), quantize=fmt, **settings
    )
    return model, module, x


def logits(module: torchrefit.CompiledModule, name: str, x: tuple) -> torch.Tensor:
    out = module(*x, **kwargs(name))
    return out if isinstance(out, torch.Tensor) else out.logits


def quantized_keys(module: torchrefit.CompiledModule) -> dict[str, str]:
    """Quantized store key -> its source FQN."""
    return {
        k: lineage.sources[0]
        for k, lineage in module.weight_map().items()
        if k.startswith(("~fp8:", "~int8:"))
    }


# -- the definition and its kernels -----------------------------------------------------------


def test_definition_fits_the_issue_and_holds_zero_rows() -> None:
    w = torch.randn(6, 40) * 3
    w[2] = 0
    for fmt, (dtype, top) in FORMATS.items():
        q, s = reference(w, fmt)
        assert q.dtype == dtype and s.dtype == torch.float32 and s.shape == (6, 1)
        amax = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-12)
        assert torch.equal(s, amax / top)
        assert torch.equal(q[2].float(), torch.zeros(40))  # an all-zero row: the clamp
        assert (dequantize(q, s, torch.float32) - w).abs().max() <= s.max() * (
            16 if fmt == "fp8" else 0.5
        )


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs Triton")
def test_kernels_under_the_triton_interpreter() -> None:
    """The quantize kernel bit-identical to the definition (fp32/bf16/fp16 sources, zero and
    tiny rows, odd lengths), and the matrix kernel within fp16 rounding, on CPU tensors run
    by Triton's interpreter."""
    run_interpreted("from test_quantize import kernel_trials; kernel_trials()")


def kernel_trials(device: str = "cpu") -> None:
    """Bitwise: the quantize kernel against the definition on `device`; within rounding:
    the matrix kernel against dequantize-then-mm (fp16 activations; bf16 on a GPU too)."""
    from torchrefit.quantize import kernels

    gen = torch.Generator().manual_seed(0)
    for fmt in FMTS:
        for cols in (1, 7, 64, 300, 2048):
            for dtype in (torch.float32, torch.bfloat16, torch.float16):
                w = torch.randn(9, cols, generator=gen) * torch.logspace(-3, 3, 9)[:, None]
                w[1] = 0
                w[2] = 1e-30 if dtype == torch.float32 else 0
                w = w.to(dtype).to(device)
                q, s = kernels.quantize_rows(w, fmt)
                want_q, want_s = reference(w, fmt)
                assert torch.equal(s.view(torch.int32), want_s.view(torch.int32)), (fmt, cols)
                assert torch.equal(q.view(torch.uint8), want_q.view(torch.uint8)), (fmt, cols)
    types = (torch.float16, torch.bfloat16) if device == "cuda" else (torch.float16,)
    for fmt in FMTS:
        for dtype in types:
            for m, n, k in ((1, 40, 64), (5, 33, 80), (40, 300, 128)):
                x = torch.randn(m, k, generator=gen).to(dtype).to(device)
                q, s = reference(torch.randn(n, k, generator=gen).to(device), fmt)
                for bias in (None, torch.randn(n, generator=gen).to(dtype).to(device)):
                    got = kernels.quant_mm(x, q, s, bias).float()
                    w = dequantize(q, s, dtype).t()
                    want = (torch.mm(x, w) if bias is None else torch.addmm(bias, x, w)).float()
                    assert ((got - want).norm() / want.norm()) < 1e-2, (fmt, dtype, m, n, k)


# -- engines --------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("name", sorted(MODELS))
def test_outputs_equal_eager_with_fake_quantized_weights(name: str, fmt: str) -> None:
    model, module, x = compiled(name, fmt)
    got = logits(module, name, x)
    assert_matches(got, run(fake_quantized(model, fmt), name, x))
    assert relative_error(got, run(model, name, x)) > 1e-3  # quantized: not the model itself
    # every linear weight quantized, nothing else: the store holds no full-precision copy
    # of them (but a tied embedding's lookup keeps its own)
    state = module._torchrefit
    assert set(quantized_keys(module).values()) == set(linear_weights(model))
    for key, fqn in quantized_keys(module).items():
        assert state.store[key].dtype == FORMATS[fmt][0]
        scale = key.replace(f"~{fmt}:", f"~{fmt}_scale:")
        assert state.store[scale].dtype == torch.float32
        assert "quantized" in module.weight_map()[key].note
        embedding = fqn in ("lm_head.weight",) and name == "gpt2"  # tied: the lookup's
        assert (fqn in state.store.tensors) == embedding


def test_inductor_engines_on_cpu() -> None:
    model, module, x = compiled("llama", "fp8", backend="inductor")
    assert {e.backend for e in module.engines().values()} == {"inductor"}
    assert_matches(logits(module, "llama", x), run(fake_quantized(model, "fp8"), "llama", x))
    trainer = llama(seed=3)
    torchrefit.refit_module_weights(module, trainer, in_place=True)
    want = run(fake_quantized(trainer, "fp8"), "llama", x)
    assert_matches(logits(module, "llama", x), want)


def test_the_setting_marks_the_engine() -> None:
    plain, fp8 = (compiled("mlp", fmt)[1] for fmt in (None, "fp8"))
    assert plain._torchrefit.fingerprint != fp8._torchrefit.fingerprint
    assert fp8.settings.quantize == "fp8" and fp8.settings.engine_key()["quantize"] == "fp8"
    with pytest.raises(torchrefit.SettingsError, match="quantize"):
        torchrefit.Settings(quantize="int4")


# -- refits -----------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_refits_are_exact_and_repeatable(name: str, fmt: str) -> None:
    """W, W', W again: outputs bit-identical to the first; a fresh compile with W' and a
    refit to W' bit-identical too; W' matches eager with W' fake-quantized."""
    model, module, x = compiled(name, fmt)
    first = logits(module, name, x)
    trainer = MODELS[name](5)
    torchrefit.refit_module_weights(module, trainer.state_dict(), in_place=True)
    refitted = logits(module, name, x)
    assert_matches(refitted, run(fake_quantized(trainer, fmt), name, x))
    _, fresh, _ = compiled(name, fmt, seed=5)
    assert torch.equal(refitted, logits(fresh, name, x))
    for key in quantized_keys(module):
        assert torch.equal(
            module._torchrefit.store[key].view(torch.uint8),
            fresh._torchrefit.store[key].view(torch.uint8),
        )
    torchrefit.refit_module_weights(module, model, in_place=True)
    assert torch.equal(logits(module, name, x), first)


def test_every_door_requantizes(tmp_path) -> None:
    """A file, a Refitter bound to a trainer's tensors (updated in place), a MutableModule,
    an out-of-place refit and a double-buffered module all give the fake-quantized outputs."""
    model, module, x = compiled("llama", "int8")
    trainer = llama(seed=2)
    path = str(tmp_path / "w.safetensors")
    safetensors.torch.save_file(trainer.state_dict(), path)
    copy_ = torchrefit.refit_module_weights(module, path)
    want = run(fake_quantized(trainer, "int8"), "llama", x)
    assert torch.equal(
        logits(copy_, "llama", x), logits(compiled("llama", "int8", 2)[1], "llama", x)
    )
    assert_matches(logits(copy_, "llama", x), want)
    assert_matches(logits(module, "llama", x), run(fake_quantized(model, "int8"), "llama", x))
    refit = torchrefit.Refitter(module, trainer)
    refit()
    assert torch.equal(logits(module, "llama", x), logits(copy_, "llama", x))
    with torch.no_grad():
        for p in trainer.parameters():
            p.mul_(1.5)
    refit()
    assert_matches(logits(module, "llama", x), run(fake_quantized(trainer, "int8"), "llama", x))
    _, double, _ = compiled("mlp", "fp8", double_buffer=True)
    other = mlp(4)
    torchrefit.refit_module_weights(double, other, in_place=True)
    assert_matches(double(*inputs("mlp")), run(fake_quantized(other, "fp8"), "mlp", inputs("mlp")))


def test_mutable_module_requantizes_changed_weights() -> None:
    model = mlp(0)
    mutable = torchrefit.MutableModule(model, quantize="fp8", backend="eager")
    x = inputs("mlp")
    assert_matches(mutable(*x), run(fake_quantized(model, "fp8"), "mlp", x))
    with torch.no_grad():
        model.fc2.weight.mul_(-2)
    assert_matches(mutable(*x), run(fake_quantized(model, "fp8"), "mlp", x))


@pytest.mark.parametrize("double_buffer", [False, True])
def test_nan_in_a_source_is_refused_and_zero_rows_are_fine(double_buffer: bool) -> None:
    model, module, x = compiled("mlp", "fp8", double_buffer=double_buffer)
    before = module(*x)
    bad = mlp(3)
    with torch.no_grad():
        bad.fc2.weight[5, 7] = float("nan")
    with pytest.raises(torchrefit.WeightValueError, match="fc2.weight"):
        torchrefit.refit_module_weights(module, bad, in_place=True)
    assert torch.equal(module(*x), before)
    with torch.no_grad():
        bad.fc2.weight[5, 7] = float("inf")
    with pytest.raises(torchrefit.WeightValueError, match="fc2.weight"):
        torchrefit.Refitter(module, bad)()
    assert torch.equal(module(*x), before)
    with torch.no_grad():
        bad.fc2.weight[5] = 0
        bad.fc1.weight.zero_()
    torchrefit.refit_module_weights(module, bad, in_place=True)
    assert_matches(module(*x), run(fake_quantized(bad, "fp8"), "mlp", x))


# -- quantized checkpoints --------------------------------------------------------------------


def quantized_checkpoint(
    model: torch.nn.Module, fmt: str, vector_scales: bool = True
) -> dict[str, torch.Tensor]:
    """A compressed-tensors style state_dict: `X.weight` quantized (in its stored layout),
    `X.weight_scale` one float32 per output channel."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for fqn, columns in linear_weights(model).items():
        if fqn not in state:
            continue
        q, s = reference(state[fqn], fmt, columns)
        state[fqn] = q.t().contiguous() if columns else q
        state[fqn + "_scale"] = s.flatten() if vector_scales else s
    return state


@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_quantized_checkpoints_bind_as_they_are(name: str, fmt: str, tmp_path) -> None:
    """A state_dict or safetensors file of fp8/int8 weights and scales: the engine's
    constants are the given bytes; into a full-precision engine, dequantized."""
    model, module, x = compiled(name, fmt)
    trainer = MODELS[name](6)
    checkpoint = quantized_checkpoint(trainer, fmt, vector_scales=name == "llama")
    path = str(tmp_path / "q.safetensors")
    safetensors.torch.save_file(checkpoint, path)
    want = logits(compiled(name, fmt, 6)[1], name, x)
    for source in (checkpoint, path):
        refitted = torchrefit.refit_module_weights(module, source)
        assert torch.equal(logits(refitted, name, x), want)
        store = refitted._torchrefit.store
        for key, fqn in quantized_keys(module).items():
            given = checkpoint[fqn]
            given = given.t() if linear_weights(trainer)[fqn] else given
            assert torch.equal(store[key].view(torch.uint8), given.view(torch.uint8))
    if name == "gpt2":
        return  # a full-precision engine takes square weights' scales per row (README)
    _, plain, _ = compiled(name, None)
    torchrefit.refit_module_weights(plain, path, in_place=True)
    assert_matches(logits(plain, name, x), run(fake_quantized(trainer, fmt), name, x))


def test_a_checkpoint_of_the_other_format_is_requantized() -> None:
    model, module, x = compiled("mlp", "fp8")
    trainer = mlp(8)
    checkpoint = quantized_checkpoint(trainer, "int8")
    torchrefit.refit_module_weights(module, checkpoint, in_place=True)
    dequantized = {k: v for k, v in checkpoint.items() if not k.endswith("_scale")}
    for fqn in linear_weights(trainer):
        dequantized[fqn] = dequantize(checkpoint[fqn], checkpoint[fqn + "_scale"], torch.float32)
    assert torch.equal(module(*x), torchrefit.refit_module_weights(module, dequantized)(*x))


def test_bad_quantized_checkpoints_are_refused() -> None:
    _, module, x = compiled("mlp", "fp8")
    before = module(*x)
    checkpoint = quantized_checkpoint(mlp(1), "fp8")
    checkpoint["fc2.weight"].view(torch.uint8)[3, 3] = 0x7F  # NaN in e4m3fn
    with pytest.raises(torchrefit.WeightValueError, match="fc2.weight"):
        torchrefit.refit_module_weights(module, checkpoint, in_place=True)
    checkpoint = quantized_checkpoint(mlp(1), "fp8")
    checkpoint["fc1.weight_scale"] = checkpoint["fc1.weight_scale"][:1]  # per tensor
    with pytest.raises(torchrefit.WeightShapeError, match="fc1.weight_scale"):
        torchrefit.refit_module_weights(module, checkpoint, in_place=True)
    checkpoint = quantized_checkpoint(mlp(1), "fp8")
    checkpoint["fc3.weight_scale"][0] = float("nan")
    with pytest.raises(torchrefit.WeightValueError):
        torchrefit.refit_module_weights(module, checkpoint, in_place=True)
    assert torch.equal(module(*x), before)


# -- files and generation ---------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FMTS)
def test_save_load_keeps_quantized_constants(fmt: str, tmp_path) -> None:
    model, module, x = compiled("llama", fmt)
    _, plain, _ = compiled("llama", None)
    path, plain_path = str(tmp_path / "q.trf"), str(tmp_path / "plain.trf")
    torchrefit.save(module, path)
    torchrefit.save(plain, plain_path)
    loaded = torchrefit.load(path)
    assert torch.equal(logits(loaded, "llama", x), logits(module, "llama", x))
    summary = inspect_file(path)
    dtypes = {c["name"]: c["dtype"] for c in summary["constants"]}
    assert {dtypes[k] for k in quantized_keys(module)} == {str(FORMATS[fmt][0])[6:]}
    notes = {c["name"]: c.get("note", "") for c in summary["constants"]}
    assert all("quantized" in notes[k] for k in quantized_keys(module))
    weights = summary["weight_bytes"] / inspect_file(plain_path)["weight_bytes"]
    assert weights < 0.5  # float32 -> 1 byte for every linear weight (the embedding stays)
    trainer = llama(seed=9)
    refitted = torchrefit.load(path, weights=trainer.state_dict())
    assert_matches(logits(refitted, "llama", x), run(fake_quantized(trainer, fmt), "llama", x))


def test_stored_graphs_name_only_allowed_ops() -> None:
    _, module, _ = compiled("mlp", "int8")
    program = module._torchrefit.weight_program
    again = graph_from_json(graph_to_json(program.graph))
    assert [n.target for n in again.nodes] == [n.target for n in program.graph.nodes]
    stored = graph_to_json(program.graph)
    node = next(n for n in stored if n.get("target", "").startswith("torch.ops.torchrefit"))
    node["target"] = "torch.ops.torchrefit.something_else.default"
    with pytest.raises(torchrefit.UnsupportedGraphError, match="refused"):
        graph_from_json(stored)


def reference_generate(model, ids, mask, **kw) -> torch.Tensor:
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return copy.deepcopy(model).generate(ids, attention_mask=mask, do_sample=False, **kw)


@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("family", ["gpt2", "llama", "llama-tied"])
def test_compile_lm_greedy_tokens_equal_transformers_fake_quantized(family: str, fmt: str) -> None:
    build = {"gpt2": gpt2, "llama": llama, "llama-tied": lambda s=0: llama(s, tied=True)}
    model = build[family]()
    lm = torchrefit.compile_lm(
        model, max_batch_size=2, max_seq_len=40, quantize=fmt, backend="eager"
    )
    ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    got = lm.generate(ids, attention_mask=mask, max_new_tokens=12)
    assert torch.equal(
        got, reference_generate(fake_quantized(model, fmt), ids, mask, max_new_tokens=12)
    )
    with torch.no_grad():
        plain = model(ids, attention_mask=mask).logits
    assert relative_error(lm(ids, attention_mask=mask), plain) > 1e-3  # quantized
    trainer = build[family](4)
    torchrefit.refit_module_weights(lm, trainer.state_dict(), in_place=True)
    got = lm.generate(ids, attention_mask=mask, max_new_tokens=12)
    want = reference_generate(fake_quantized(trainer, fmt), ids, mask, max_new_tokens=12)
    assert torch.equal(got, want)


def test_the_kernel_form_and_its_batch_1_rewrite(monkeypatch) -> None:
    """The graph a CUDA engine gets (`torchrefit::quant_mm`, whose products of one row the
    decode variants rewrite into aten ops for Inductor to fuse), built on CPU, where the op
    computes the definition: greedy tokens equal transformers' on the fake-quantized model,
    through the general engine (batch 2) and the batch-1 variant, before and after a refit."""
    passes = importlib.import_module("torchrefit.lower.quantize")
    ops = importlib.import_module("torchrefit.quantize.ops")
    monkeypatch.setattr(passes, "KERNEL_DEVICES", ("cuda", "cpu"))
    model, trainer = llama(), llama(seed=2)
    lm = torchrefit.compile_lm(
        model, max_batch_size=2, max_seq_len=32, quantize="fp8", decode_batch_sizes=[1]
    )
    (engine,) = lm.engines().values()
    assert len(engine.variants) == 1
    calls = []
    original = ops.reference_mm
    monkeypatch.setattr(ops, "reference_mm", lambda *a: calls.append(1) or original(*a))
    ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    layers = len(linear_weights(model))
    for weights in (model, trainer):
        if weights is trainer:
            torchrefit.refit_module_weights(lm, trainer, in_place=True)
        fake = fake_quantized(weights, "fp8")
        for rows in (ids[:1], ids):
            calls.clear()
            want = reference_generate(fake, rows, mask[: len(rows)], max_new_tokens=8)
            got = lm.generate(rows, attention_mask=mask[: len(rows)], max_new_tokens=8)
            assert torch.equal(got, want)
            # batch 1: only the prefill calls the op, its decode steps run the rewritten variant
            assert len(calls) == layers * (1 if len(rows) == 1 else 8)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_exported_programs_and_verified_refits(name: str) -> None:
    """An ExportedProgram refits by the fast path and by the slow one (lowered again, the
    quantized constants paired by position); verify_output compares with eager computing
    with the engine's dequantized weights (the tied lookup in full precision)."""
    _, module, x = compiled(name, "fp8")
    new = MODELS[name](3)
    want = logits(compiled(name, "fp8", 3)[1], name, x)
    program = torch.export.export(new, x, kwargs(name), strict=False)
    for cache in (True, False):
        refitted = torchrefit.refit_module_weights(
            module, program, arg_inputs=x, kwarg_inputs=kwargs(name), use_weight_map_cache=cache
        )
        assert torch.equal(logits(refitted, name, x), want)
    refitted = torchrefit.refit_module_weights(
        module, new, arg_inputs=x, kwarg_inputs=kwargs(name), verify_output=True
    )
    assert torch.equal(logits(refitted, name, x), want)


def test_the_benchmark_runs_on_cpu(tmp_path) -> None:
    """bench/quant_bench.py --tiny: every section runs; the quantized constants a Refitter
    wrote are the definition's."""
    out = tmp_path / "quant.json"
    bench = Path(__file__).parents[1] / "bench" / "quant_bench.py"
    args = ["--tiny", "--backend", "eager", "--prompt", "8", "--new", "4", "--batches", "1,2"]
    done = subprocess.run(
        [sys.executable, str(bench), *args, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    results = json.loads(out.read_text())
    assert results["refits"]["fp8_bit_identical_to_definition"] is True
    assert results["refits"]["int8_bit_identical_to_definition"] is True
    assert results["memory"]["fp8_weight_bytes_vs_bf16"] < 0.75
    assert results["accuracy"]["fp8_vs_fake_quantized_eager_rel_error"] < 1e-4
