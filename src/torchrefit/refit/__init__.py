"""The refit core: read, match, evaluate + validate, commit, verify.

Stages, one module each, low to high: `read` (and `files` for safetensors), `match`,
`evaluate` (evaluate and validate), `commit`, `verify`; `core` chains them. Every front end
(`refit_module_weights`, `Refitter`, `MutableModule`, the cache, `load(path, weights=...)`)
calls these stages and nothing else. Stage functions are imported from their modules
(`from torchrefit.refit.match import match`), so a module and its function never shadow
each other here.
"""

from .core import adopt, refit_module_weights, refittable

__all__ = ["adopt", "refit_module_weights", "refittable"]
