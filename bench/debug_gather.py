"""Debug the gather-copy kernel on a GPU: far-apart sources, then a Refitter."""
import os
import sys

import torch

sys.path.insert(0, "tests")
from torchrefit.copy_kernel import GatherCopy  # noqa: E402

dev = torch.device("cuda")
arena = torch.zeros(1 << 20, dtype=torch.float16, device=dev)
keep = [torch.randn(1 << 22, device=dev) for _ in range(4)]  # push allocations apart
srcs = [torch.randn(n, device=dev, dtype=torch.float16) for n in (64, 8192, 10000 * 8)]
dsts = [arena[i * 200000 : i * 200000 + s.numel()] for i, s in enumerate(srcs)]
print("offsets", [(s.data_ptr() - arena.data_ptr()) // 2 for s in srcs], flush=True)
g = GatherCopy(arena, dsts, srcs)
print("tables", [t.tolist()[:6] for t in g.tables], g.grid, flush=True)
g()
torch.cuda.synchronize()
print("far sources equal:", all(torch.equal(d, s) for d, s in zip(dsts, srcs)), flush=True)
older = torch.randn(100, device=dev, dtype=torch.float16)  # likely below the arena
import torchrefit  # noqa: E402

from cases import CASES  # noqa: E402

case = CASES["conv_bn"]
a, b = case.build(0).cuda().half(), case.build(1).cuda().half()
x = tuple(t.cuda().half() for t in case.inputs())
m = torchrefit.compile(a, x)
r = torchrefit.Refitter(m, b)
print("refitter built; gather:", [type(c).__name__ for c in r._copies({k: m._torchrefit.store[k].clone() for k in m._torchrefit.store.keys()})], flush=True)
r()
torch.cuda.synchronize()
print("refitter ran", os.environ.get("TORCHREFIT_GATHER_COPY"), flush=True)
