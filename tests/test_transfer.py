"""The commit's write: every source byte read once, checked where it is copied, never a
NaN served, whatever the source does meanwhile.

Regression tests for issue 16: a file rewritten while a plain module refits from it (it
was checked in one read and copied in a second), complex weights holding NaN (accepted:
complex is not "floating"), and a stripped module refitted into a copy (the copy inherited
"unset" and refused to run).
"""

from __future__ import annotations

import importlib.util
import os
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import torchrefit
import torchrefit.refit.files as files
import torchrefit.refit.transfer as transfer

from helpers import assert_differs, assert_matches, run_eager, run_interpreted

NAN = float("nan")


class Wide(nn.Module):
    """Two linear layers; by default weights of 4 MB and 2 MB: with the smallest staging
    area (1 MB) each is split."""

    def __init__(self, seed: int, sizes: tuple[int, int, int] = (1024, 1024, 512)) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.a = nn.Linear(sizes[0], sizes[1])
        self.b = nn.Linear(sizes[1], sizes[2])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


def _file(tmp_path, model: nn.Module, name: str = "w.safetensors") -> str:
    path = str(tmp_path / name)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    return path


def _bytes_read(monkeypatch) -> dict[str, int]:
    """Bytes read from each file, counted where every file read goes through."""
    counts: dict[str, int] = {}
    chunks_of = files.chunks_of

    def counting(f, t, buffer):
        for first, chunk in chunks_of(f, t, buffer):
            counts[t.path] = counts.get(t.path, 0) + chunk.numel() * chunk.element_size()
            yield first, chunk

    monkeypatch.setattr(transfer, "chunks_of", counting)
    monkeypatch.setattr(files, "chunks_of", counting)
    return counts


@pytest.mark.parametrize("double_buffer", [False, True])
def test_a_file_refit_reads_each_byte_once(tmp_path, monkeypatch, double_buffer: bool) -> None:
    a, b = Wide(0).eval(), Wide(1).eval()
    x = torch.randn(4, 1024)
    compiled = torchrefit.compile(a, (x,), backend="eager", double_buffer=double_buffer)
    path = _file(tmp_path, b)
    counts = _bytes_read(monkeypatch)
    torchrefit.refit_module_weights(compiled, path, in_place=True)
    nbytes = sum(v.numel() * v.element_size() for v in b.state_dict().values())
    assert counts == {path: nbytes}
    assert_matches(compiled(x), run_eager(b, x))


def test_a_file_rewritten_after_it_was_read_changes_nothing(tmp_path, monkeypatch) -> None:
    """The staged bytes are what was checked and what is copied: rewriting the file with NaN
    between the read and the copy cannot reach the engines."""
    a, b = Wide(0).eval(), Wide(1).eval()
    x = torch.randn(4, 1024)
    compiled = torchrefit.compile(a, (x,), backend="eager")
    path = _file(tmp_path, b)
    poisoned = Wide(1).eval()
    with torch.no_grad():
        poisoned.a.weight.fill_(NAN)
    write = transfer.Transfer.write

    def rewrite_then_write(self) -> None:
        _file(tmp_path, poisoned)  # the same path, now holding NaN
        write(self)

    monkeypatch.setattr(transfer.Transfer, "write", rewrite_then_write)
    torchrefit.refit_module_weights(compiled, path, in_place=True)
    assert_matches(compiled(x), run_eager(b, x))


def test_a_source_changed_between_two_passes_leaves_weights_unset(tmp_path, monkeypatch) -> None:
    """Larger than the staging area, a source is read twice: a NaN the second pass finds is
    never copied, and what the second pass wrote before it is marked unset (the module
    refuses to run) until a refit succeeds."""
    a, b = Wide(0).eval(), Wide(1).eval()
    x = torch.randn(4, 1024)
    compiled = torchrefit.compile(a, (x,), backend="eager", staging_bytes=1 << 20)
    before = compiled(x)
    path = _file(tmp_path, b)
    torchrefit.refit_module_weights(compiled, path, in_place=True)  # two passes, all clean
    assert_matches(compiled(x), run_eager(b, x))
    torchrefit.refit_module_weights(compiled, a, in_place=True)
    assert torch.equal(compiled(x), before)

    poisoned = Wide(1).eval()
    with torch.no_grad():
        poisoned.b.weight[-1, -1] = NAN  # in the last piece read
    second = transfer.Transfer._second_pass

    def rewrite_then_second_pass(self) -> None:
        _file(tmp_path, poisoned)
        second(self)

    monkeypatch.setattr(transfer.Transfer, "_second_pass", rewrite_then_second_pass)
    with pytest.raises(torchrefit.WeightValueError, match="unset"):
        torchrefit.refit_module_weights(compiled, path, in_place=True)
    with pytest.raises(torchrefit.WeightsNotLoadedError):
        compiled(x)
    store = compiled._torchrefit.store
    assert all(bool(torch.isfinite(t).all()) for t in store.tensors.values())
    torchrefit.refit_module_weights(compiled, b, in_place=True)
    assert_matches(compiled(x), run_eager(b, x))


def test_a_source_refused_in_the_first_pass_writes_nothing(tmp_path) -> None:
    a = Wide(0).eval()
    x = torch.randn(4, 1024)
    compiled = torchrefit.compile(a, (x,), backend="eager", staging_bytes=1 << 20)
    before = compiled(x)
    poisoned = Wide(1).eval()
    with torch.no_grad():
        poisoned.b.bias[3] = float("inf")
    with pytest.raises(torchrefit.WeightValueError, match=r"'b\.bias'.*inf"):
        torchrefit.refit_module_weights(compiled, _file(tmp_path, poisoned), in_place=True)
    assert torch.equal(compiled(x), before)


def test_concurrent_rewrites_of_a_file_never_reach_the_engines(tmp_path) -> None:
    """A writer alternates the file between finite weights and NaN (each write atomic, as
    safetensors' writers do); every refit either refuses or leaves only finite weights."""
    a, b = Wide(0).eval(), Wide(1).eval()
    x = torch.randn(4, 1024)
    compiled = torchrefit.compile(a, (x,), backend="eager")
    path = _file(tmp_path, b)
    poisoned = Wide(1).eval()
    with torch.no_grad():
        poisoned.a.weight[100, 7] = NAN
    stop = threading.Event()
    bad = _file(tmp_path, poisoned, "bad.safetensors")
    good = _file(tmp_path, b, "good.safetensors")

    def rewriting() -> None:
        import shutil

        i = 0
        while not stop.is_set():
            shutil.copyfile(bad if i % 2 else good, path + ".tmp")
            os.replace(path + ".tmp", path)
            i += 1

    writer = threading.Thread(target=rewriting)
    writer.start()
    refused = accepted = 0
    try:
        for _ in range(60):
            try:
                torchrefit.refit_module_weights(compiled, path, in_place=True)
                accepted += 1
            except (torchrefit.WeightValueError, torchrefit.IncompatibleWeightsError):
                refused += 1
            store = compiled._torchrefit.store
            assert all(bool(torch.isfinite(t).all()) for t in store.tensors.values())
    finally:
        stop.set()
        writer.join()
    assert accepted and refused
    torchrefit.refit_module_weights(compiled, good, in_place=True)
    assert_matches(compiled(x), run_eager(b, x))


def test_pieces_of_a_value_cover_every_element_once() -> None:
    t = torch.empty(1000, dtype=torch.float32)
    pieces = transfer._split("w", t, 1024)  # 256 elements a piece
    assert [(p.start, p.numel) for p in pieces] == [(0, 256), (256, 256), (512, 256), (768, 232)]
    assert transfer._split("w", t, 1 << 20)[0].numel == 1000


class ComplexWeight(nn.Module):
    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.z = nn.Parameter(torch.randn(8, dtype=torch.complex64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x * self.z).abs()


@pytest.mark.parametrize("double_buffer", [False, True])
@pytest.mark.parametrize("part", ["real", "imag"])
def test_complex_weights_holding_nan_are_refused(double_buffer: bool, part: str) -> None:
    a, b = ComplexWeight(0).eval(), ComplexWeight(1).eval()
    x = torch.randn(3, 8, dtype=torch.complex64)
    compiled = torchrefit.compile(a, (x,), backend="eager", double_buffer=double_buffer)
    before = compiled(x)
    bad = {"z": b.z.detach().clone()}
    getattr(bad["z"], part)[5] = NAN
    for door in ("refit", "refitter"):
        with pytest.raises(torchrefit.WeightValueError, match="'z'.*NaN"):
            if door == "refit":
                torchrefit.refit_module_weights(compiled, bad, in_place=True)
            else:
                torchrefit.Refitter(compiled, bad)()
        assert torch.equal(compiled(x), before)
    torchrefit.refit_module_weights(compiled, b, in_place=True)
    assert_matches(compiled(x), run_eager(b, x))


@pytest.mark.parametrize("source", ["state_dict", "safetensors", "module"])
def test_a_stripped_module_refitted_into_a_copy_runs(tmp_path, source: str) -> None:
    """`refit_module_weights(load(stripped), weights)` (in_place=False, the default) gives a
    copy holding every constant: it runs, and equals eager with those weights."""
    a, b = Wide(0).eval(), Wide(1).eval()
    x = torch.randn(4, 1024)
    compiled = torchrefit.compile(a, (x,), backend="eager")
    path = str(tmp_path / "m.trf")
    torchrefit.save(compiled, path, include_weights=False)
    stripped = torchrefit.load(path)
    weights = {"state_dict": b.state_dict(), "module": b}.get(source) or _file(tmp_path, b)
    copy = torchrefit.refit_module_weights(stripped, weights)
    assert_matches(copy(x), run_eager(b, x))
    with pytest.raises(torchrefit.WeightsNotLoadedError):
        stripped(x)  # the original stays as it was


def test_check_finite_false_copies_without_looking() -> None:
    a, b = Wide(0).eval(), Wide(1).eval()
    x = torch.randn(4, 1024)
    compiled = torchrefit.compile(a, (x,), backend="eager", check_finite=False)
    bad = {k: v.clone() for k, v in b.state_dict().items()}
    bad["a.bias"][0] = NAN
    torchrefit.refit_module_weights(compiled, bad, in_place=True)  # no check: copied
    assert bool(torch.isnan(compiled._torchrefit.store["a.bias"]).any())
    with pytest.raises(torchrefit.WeightValueError, match="a.bias"):
        torchrefit.refit_module_weights(compiled, bad, in_place=True, check_finite=True)
    torchrefit.refit_module_weights(compiled, b, in_place=True)
    assert_matches(compiled(x), run_eager(b, x))
    assert_differs(compiled(x), run_eager(a, x))


# -- the kernel path, run by Triton's interpreter on CPU tensors -------------------------------


def Small(seed: int) -> nn.Module:  # noqa: N802 - a model, named as the class above
    return Wide(seed, (64, 48, 16))


def _kernels_on_cpu() -> None:
    """The kernels switched on for CPU tensors, and torch's reductions forbidden for
    floating values (every one must go through a kernel)."""
    from torchrefit.copy_kernel import COPY_BITS, FLOAT_BITS

    transfer.use_kernels = lambda device: True
    transfer.finite_kernels_work = lambda device, dtype: dtype in FLOAT_BITS
    transfer.gather_copy_works = lambda device, dtype: dtype in COPY_BITS
    torch_check = transfer.refused_on_cpu

    def no_torch_reads(tensors, *args):
        floating = {k: v for k, v in tensors.items() if v.is_floating_point()}
        assert not floating, f"read by torch: {sorted(floating)}"
        return torch_check(tensors, *args)

    transfer.refused_on_cpu = no_torch_reads
    launch = transfer.launch

    def counted(*args, **kwargs):
        LAUNCHES.append(kwargs)
        return launch(*args, **kwargs)

    transfer.launch = counted


LAUNCHES: list[dict[str, bool]] = []


def _kinds_of_sources(model: nn.Module, tmp) -> dict[str, object]:
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    misaligned = {
        k: torch.cat([v.new_zeros(1), v.reshape(-1)])[1:].view(v.shape) for k, v in state.items()
    }
    strided = {k: v.t().contiguous().t() if v.dim() == 2 else v for k, v in state.items()}
    return {
        "in_place": state,
        "misaligned": misaligned,
        "strided": strided,
        "file": _file(tmp, model, f"{id(model)}.safetensors"),
    }


def interpreted_transfer_doors() -> None:
    """Every way a value reaches a store, through the kernels (Triton's interpreter runs
    them on CPU tensors): in place, misaligned and strided views staged, a file staged, two
    passes through a small staging area, double-buffered, a Refitter; each checked against
    eager, and a NaN in each refused with nothing written."""
    import tempfile

    _kernels_on_cpu()
    tmp = Path(tempfile.mkdtemp())
    a, b, bad = Small(0).eval(), Small(1).eval(), Small(1).eval()
    with torch.no_grad():
        bad.a.weight[5, 5] = NAN
    good, poisoned = _kinds_of_sources(b, tmp), _kinds_of_sources(bad, tmp)
    x = torch.randn(3, 64)
    staging = transfer.Transfer.staging_bytes
    for small in (False, True):  # small: 4 KB batches, so two passes
        transfer.Transfer.staging_bytes = (lambda self: 4096) if small else staging
        for double_buffer in (False, True):
            compiled = torchrefit.compile(a, (x,), backend="eager", double_buffer=double_buffer)
            for kind, source in good.items():
                torchrefit.refit_module_weights(compiled, source, in_place=True)
                assert_matches(compiled(x), run_eager(b, x))
                before = compiled(x)
                with pytest.raises(torchrefit.WeightValueError, match=r"a\.weight"):
                    torchrefit.refit_module_weights(compiled, poisoned[kind], in_place=True)
                assert torch.equal(compiled(x), before), kind
            torchrefit.refit_module_weights(compiled, a, in_place=True)
            torchrefit.Refitter(compiled, b)()
            assert_matches(compiled(x), run_eager(b, x))
    gated = [k for k in LAUNCHES if k.get("cond")]
    assert gated and any(k["check"] and not k["copy"] for k in LAUNCHES), "kernels not launched"


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs Triton")
def test_the_kernel_path_under_the_triton_interpreter() -> None:
    run_interpreted(
        "from test_transfer import interpreted_transfer_doors; interpreted_transfer_doors()"
    )


# -- what a review of the write paths found ---------------------------------------------------


def test_state_a_forward_writes_survives_double_buffer_flips() -> None:
    """The state (a counter here, a KV cache in a CompiledLM) is one memory in both banks:
    a flip never rolls it back."""
    from test_stateful import Counter

    torch.manual_seed(0)
    model, x = Counter().eval(), torch.randn(2, 4)
    compiled = torchrefit.compile(model, (x,), backend="eager", double_buffer=True)
    key = next(k for k in compiled._torchrefit.store.keys() if k.endswith("calls"))
    for flips in range(4):
        for _ in range(2):
            compiled(x)
        assert float(compiled._torchrefit.store[key]) == 2 * (flips + 1)
        torchrefit.refit_module_weights(compiled, model, in_place=True)
        assert float(compiled._torchrefit.store[key]) == 2 * (flips + 1)


def test_a_write_that_fails_midway_leaves_the_module_refusing_to_run(monkeypatch) -> None:
    """Anything that raises once the copy into a live store began (a device error, an
    interrupt) leaves the refitted constants unset: never a mix that runs."""
    a, b = Small(0).eval(), Small(1).eval()
    x = torch.randn(3, 64)
    compiled = torchrefit.compile(a, (x,), backend="eager")
    real = transfer.copy_into

    def failing(store, values) -> None:
        real(store, dict(list(values.items())[:1]))  # one constant written, then an error
        raise KeyboardInterrupt

    monkeypatch.setattr(transfer, "copy_into", failing)
    with pytest.raises(KeyboardInterrupt):
        torchrefit.refit_module_weights(compiled, b, in_place=True)
    with pytest.raises(torchrefit.WeightsNotLoadedError, match="a refit failed"):
        compiled(x)
    monkeypatch.undo()
    torchrefit.refit_module_weights(compiled, b, in_place=True)
    assert_matches(compiled(x), run_eager(b, x))
