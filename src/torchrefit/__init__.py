"""torchrefit: compile PyTorch models into engines whose weights can be replaced in place."""

from . import distributed  # noqa: E402 - torchrefit.distributed.WeightSync
from .api import load, save
from .compile import compile
from .decoder import compile_lm
from .errors import (
    ExportError,
    ImmutableWeightsError,
    IncompatibleWeightsError,
    InputError,
    LineageError,
    MissingWeightError,
    RefitVerificationError,
    SerializationError,
    SettingsError,
    TorchRefitError,
    UnexpectedWeightError,
    UnsupportedGraphError,
    WeightDtypeError,
    WeightShapeError,
    WeightsNotLoadedError,
    WeightSyncError,
    WeightValueError,
)
from .lm import CompiledLM, GenerateOutput
from .module import CompiledModule, Engine, Fallback
from .mutable import MutableModule
from .refit import refit_module_weights
from .refitter import Refitter
from .settings import Settings

__version__ = "0.1.0"

__all__ = [
    "CompiledLM",
    "CompiledModule",
    "Engine",
    "ExportError",
    "Fallback",
    "GenerateOutput",
    "ImmutableWeightsError",
    "IncompatibleWeightsError",
    "InputError",
    "LineageError",
    "MissingWeightError",
    "MutableModule",
    "RefitVerificationError",
    "Refitter",
    "SerializationError",
    "Settings",
    "SettingsError",
    "TorchRefitError",
    "UnexpectedWeightError",
    "UnsupportedGraphError",
    "WeightDtypeError",
    "WeightShapeError",
    "WeightSyncError",
    "WeightValueError",
    "WeightsNotLoadedError",
    "compile",
    "compile_lm",
    "distributed",
    "load",
    "refit_module_weights",
    "save",
]
