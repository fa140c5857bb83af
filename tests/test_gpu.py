"""On CUDA: Inductor engines in float16, refitted from GPU and CPU weights. Skipped without CUDA."""

from __future__ import annotations

import copy

import pytest
import torch

import torchrefit

from cases import CASES
from helpers import assert_differs, assert_matches, run_eager

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("name", ["conv_bn", "bert", "gpt2"])
def test_cuda_float16_refit_matches_eager(name: str) -> None:
    case = CASES[name]
    a = case.build(0).cuda().half()
    b = case.build(1).cuda().half()

    def inputs() -> tuple[torch.Tensor, ...]:
        return tuple(x.cuda().half() if x.is_floating_point() else x.cuda() for x in case.inputs())

    compiled = torchrefit.compile(a, inputs())
    x = inputs()
    assert_matches(compiled(*x), run_eager(a, *x))
    torchrefit.refit_module_weights(compiled, b, in_place=True)
    x = inputs()
    assert_matches(compiled(*x), run_eager(b, *x))
    assert_differs(compiled(*x), run_eager(a, *x))
    cpu_weights = {k: v.cpu() for k, v in case.build(2).half().state_dict().items()}
    torchrefit.refit_module_weights(compiled, cpu_weights, in_place=True)
    c = case.build(2).cuda().half()
    assert_matches(compiled(*x), run_eager(c, *x))


def test_cuda_dtype_setting_from_float32_model(tmp_path) -> None:
    case = CASES["conv_bn"]
    a, b = case.build(0).cuda(), case.build(1).cuda()
    compiled = torchrefit.compile(a, tuple(x.cuda() for x in case.inputs()), dtype="float16")
    torchrefit.refit_module_weights(compiled, b, in_place=True)
    x = tuple(t.cuda() for t in case.inputs())
    assert_matches(compiled(*x), run_eager(copy.deepcopy(b).half(), x[0].half()))
    path = str(tmp_path / "m.trf")
    torchrefit.save(compiled, path)
    loaded = torchrefit.load(path)
    assert_matches(loaded(*x), run_eager(copy.deepcopy(b).half(), x[0].half()))


def test_cuda_graph_replay_sees_refits_and_refitter_graphs() -> None:
    case = CASES["conv_bn"]
    a, b = case.build(0).cuda().half(), case.build(1).cuda().half()
    x = tuple(t.cuda().half() for t in case.inputs())
    compiled = torchrefit.compile(a, x, cuda_graphs=True)
    assert_matches(compiled(*x), run_eager(a, *x))  # captures
    refitter = torchrefit.Refitter(compiled, b)
    assert refitter._graphs is not None
    refitter()
    y = tuple(t.cuda().half() for t in case.inputs())
    assert_matches(compiled(*y), run_eager(b, *y))  # the captured graph reads the new weights
    with torch.no_grad():
        for p in b.parameters():
            p.mul_(-1.0)
    refitter()
    assert_matches(compiled(*y), run_eager(b, *y))
    torchrefit.refit_module_weights(compiled, a, in_place=True)
    assert_matches(compiled(*y), run_eager(a, *y))


def test_gather_copy_kernel_copies_every_tensor_exactly() -> None:
    from torchrefit.copy_kernel import GatherCopy, gather_copy_works

    device = torch.device("cuda")
    assert gather_copy_works(device, torch.float16)
    sizes = [8, 1000, 8192, 8200, 70000, 3, 12345 * 8]
    arena = torch.zeros(sum(sizes) + 4096 * len(sizes), dtype=torch.float16, device=device)
    srcs = [torch.randn(n, device=device, dtype=torch.float16) for n in sizes]
    srcs[2] = torch.randn(64, 256, device=device, dtype=torch.float16).t()  # non-contiguous
    dsts, start = [], 0
    for src in srcs:
        dsts.append(arena[start : start + src.numel()].view(src.shape))
        start += -(-src.numel() // 128) * 128
    copy = GatherCopy(arena, dsts, srcs)
    assert copy.plan is not None and len(copy.rest[0]) == 1  # odd sizes too; transposed goes around
    copy()
    for d, s in zip(dsts, srcs, strict=True):
        assert torch.equal(d, s)


def test_cuda_mutable_module_with_lora() -> None:
    peft = pytest.importorskip("peft")
    case = CASES["bert"]
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["query", "value"], init_lora_weights=False
    )
    model = peft.get_peft_model(case.build(0).cuda().half(), config).eval()
    mutable = torchrefit.MutableModule(model)
    ids = lambda: (case.inputs()[0].cuda(),)  # noqa: E731
    for step in range(3):
        x = ids()
        assert_matches(mutable(*x), run_eager(model, *x))
        with torch.no_grad():
            model.base_model.model.encoder.layer[0].attention.self.query.base_layer.weight.mul_(0.9)
        if step == 1:
            model.merge_adapter()
    x = ids()
    assert_matches(mutable(*x), run_eager(model, *x))
    model.unmerge_adapter()
    assert_matches(mutable(*x), run_eager(model, *x))
    assert mutable.compiles == 1 and mutable.refits >= 3


def test_cuda_streamed_safetensors_refit(tmp_path, monkeypatch) -> None:
    from safetensors.torch import save_file

    import torchrefit.refit.files as files

    monkeypatch.setattr(files, "CHUNK_BYTES", 4096)  # many chunks through the two pinned buffers
    case = CASES["bert"]
    a, b = case.build(0).cuda().half(), case.build(1).half()
    compiled = torchrefit.compile(a, (case.inputs()[0].cuda(),))
    path = str(tmp_path / "b.safetensors")
    save_file({k: v.contiguous() for k, v in b.state_dict().items()}, path)
    torchrefit.refit_module_weights(compiled, path, in_place=True)
    x = (case.inputs()[0].cuda(),)
    assert_matches(compiled(*x), run_eager(b.cuda(), *x))


@pytest.mark.parametrize("double_buffer", [False, True])
def test_cuda_graphs_under_concurrent_refits_see_one_weight_set(double_buffer: bool) -> None:
    """Refitters on a thread and stream of their own; every call's output is exactly the
    output of weights A or of weights B, with CUDA graphs replayed (one per buffer)."""
    import threading

    case = CASES["conv_bn"]
    a, b = case.build(0).cuda().half(), case.build(1).cuda().half()
    x = tuple(t.cuda().half() for t in case.inputs())
    compiled = torchrefit.compile(a, x, cuda_graphs=True, double_buffer=double_buffer)
    refitters = (torchrefit.Refitter(compiled, a), torchrefit.Refitter(compiled, b))
    refitters[0]()
    out_a = compiled(*x)
    refitters[1]()
    out_b = compiled(*x)
    assert_matches(out_b, run_eager(b, *x))
    assert not torch.equal(out_a, out_b)
    stop = threading.Event()

    def refitting() -> None:
        with torch.cuda.stream(torch.cuda.Stream()):
            i = 0
            while not stop.is_set():
                refitters[i % 2]()
                i += 1

    worker = threading.Thread(target=refitting)
    worker.start()
    torn = 0
    try:
        for _ in range(2000):
            y = compiled(*x)
            torn += not (torch.equal(y, out_a) or torch.equal(y, out_b))
    finally:
        stop.set()
        worker.join()
    assert torn == 0, f"{torn} of 2000 calls computed with a mix of weights"
