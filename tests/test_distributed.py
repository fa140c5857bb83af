"""WeightSync over torch.distributed (Gloo on CPU, 3 processes): one trainer, two replicas."""

from __future__ import annotations

import datetime
import os
import sys
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).parent))

WORLD = 3


def _model(seed: int) -> torch.nn.Module:
    from cases import CASES

    return CASES["mlp"].build(seed)


def _worker(rank: int, init: str, scenario: str, results: str) -> None:
    import torchrefit

    try:
        dist.init_process_group(
            "gloo",
            init_method=init,
            rank=rank,
            world_size=WORLD,
            timeout=datetime.timedelta(seconds=20),
        )
        x = torch.randn(4, 16, generator=torch.Generator().manual_seed(7))
        if rank == 0:
            trainer = _model(1)
            sync = torchrefit.distributed.WeightSync(weights=trainer, src=0, timeout=5)
            opt = torch.optim.SGD(trainer.parameters(), lr=0.1)
            for step in range(3):
                if scenario == "source_dies" and step == 1:
                    os._exit(0)
                trainer(torch.randn(4, 16)).pow(2).mean().backward()
                opt.step()
                opt.zero_grad()
                sync()
                dist.barrier()
            Path(results, "0").write_text("ok")
            return
        dtype = "bfloat16" if scenario == "bf16" and rank == 2 else None
        model = _model(0) if not (scenario == "mismatch" and rank == 2) else torch.nn.Linear(16, 4)
        compiled = torchrefit.compile(
            model, (x,), backend="eager", dtype=dtype, double_buffer=rank == 1
        )
        try:
            sync = torchrefit.distributed.WeightSync(compiled=compiled, src=0, timeout=5)
        except torchrefit.IncompatibleWeightsError as exc:
            Path(results, str(rank)).write_text(f"incompatible: {exc}")
            return
        before = compiled(x)
        errors = []
        for _step in range(3):
            try:
                sync()
            except torchrefit.WeightSyncError as exc:
                unchanged = torch.equal(compiled(x), before)
                Path(results, str(rank)).write_text(f"sync error, unchanged={unchanged}: {exc}")
                return
            dist.barrier()
            before = compiled(x)
            errors.append(_compare(compiled, sync, x, dtype))
        Path(results, str(rank)).write_text(f"ok {max(errors)}")
    except Exception:  # noqa: BLE001 - the parent reads it
        Path(results, str(rank)).write_text("crash " + traceback.format_exc())


def _compare(compiled, sync, x, dtype) -> float:
    """The replica's output against eager with the trainer's current weights (received)."""
    eager = _model(0)
    eager.load_state_dict({k: v.clone() for k, v in sync.views.items()})
    if dtype:
        eager = eager.to(getattr(torch, dtype))
        x = x.to(getattr(torch, dtype))
    with torch.no_grad():
        expected = eager(x)
    return float(
        (compiled(x).float() - expected.float()).abs().max() / expected.float().abs().max()
    )


def _run(tmp_path, scenario: str) -> dict[int, str]:
    init = f"file://{tmp_path / 'init'}"
    results = tmp_path / "results"
    results.mkdir()
    ctx = mp.get_context("spawn")
    procs = [
        ctx.Process(target=_worker, args=(r, init, scenario, str(results))) for r in range(WORLD)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        if p.is_alive():
            p.kill()
            pytest.fail(f"a {scenario} rank hung")
    return {
        r: (results / str(r)).read_text() if (results / str(r)).exists() else ""
        for r in range(WORLD)
    }


def test_replicas_follow_the_trainer_exactly(tmp_path) -> None:
    out = _run(tmp_path, "plain")
    assert out[0] == "ok", out
    for rank in (1, 2):
        assert out[rank].startswith("ok"), out[rank]
        assert float(out[rank].split()[1]) < 1e-5


def test_fp32_trainer_to_a_bf16_replica(tmp_path) -> None:
    out = _run(tmp_path, "bf16")
    assert out[1].startswith("ok") and float(out[1].split()[1]) < 1e-5, out
    assert out[2].startswith("ok") and float(out[2].split()[1]) < 3e-2, out


def test_a_mismatched_replica_fails_on_every_rank(tmp_path) -> None:
    out = _run(tmp_path, "mismatch")
    assert "IncompatibleWeightsError" in out[0] and "rank 2" in out[0], out[0]  # the source too
    for rank in (1, 2):
        assert out[rank].startswith("incompatible") and "rank 2" in out[rank], out


def test_a_source_that_dies_leaves_replicas_on_their_old_weights(tmp_path) -> None:
    out = _run(tmp_path, "source_dies")
    for rank in (1, 2):
        assert out[rank].startswith("sync error, unchanged=True"), out
