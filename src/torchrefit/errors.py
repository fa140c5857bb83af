"""Every user-facing error is a TorchRefitError subclass naming what, which, and the fix."""

from __future__ import annotations

from collections.abc import Sequence


class TorchRefitError(Exception):
    """Base class of torchrefit's errors."""


class SettingsError(TorchRefitError, ValueError):
    """A setting has a value torchrefit cannot use."""


class ExportError(TorchRefitError):
    """The model could not be turned into an ExportedProgram."""


class LineageError(TorchRefitError):
    """A refittable engine would hold a weight-derived constant whose origin is unknown."""


class UnsupportedGraphError(TorchRefitError):
    """The graph holds something torchrefit cannot compile, save or load."""


class ImmutableWeightsError(TorchRefitError):
    """A refit was asked of a module compiled with immutable_weights=True."""


class IncompatibleWeightsError(TorchRefitError):
    """The new weights belong to another architecture, or do not fit the engines.

    `missing` and `unexpected` list every weight name the refit lacked or did not know (the
    message names the first few only); both are empty where the error is about something else.
    """

    def __init__(
        self, message: str, *, missing: Sequence[str] = (), unexpected: Sequence[str] = ()
    ) -> None:
        super().__init__(message)
        self.missing: list[str] = list(missing)
        self.unexpected: list[str] = list(unexpected)


class MissingWeightError(IncompatibleWeightsError):
    """A weight the engines need is absent from the new weights."""


class UnexpectedWeightError(IncompatibleWeightsError):
    """The new weights hold a name the compiled program does not have."""


class WeightShapeError(IncompatibleWeightsError):
    """A new weight has another shape than the compiled one."""


class WeightDtypeError(IncompatibleWeightsError):
    """A new weight has another dtype than the compiled one."""


class WeightValueError(IncompatibleWeightsError):
    """A new weight does not fit the engine dtype (it would become inf or NaN)."""


class RefitVerificationError(TorchRefitError):
    """After a refit the module's outputs differ from eager PyTorch's."""


class SerializationError(TorchRefitError):
    """A saved file is malformed, of another version, or fails its integrity check."""


class InputError(TorchRefitError, TypeError):
    """The compiled module was called with inputs unlike the ones it was compiled for."""


class WeightsNotLoadedError(TorchRefitError):
    """A module loaded from a file saved without weights was run before a refit."""


class WeightSyncError(TorchRefitError):
    """A weight sync could not be set up, failed, timed out, or was refused by a rank.

    For one update: `refused` maps each rank that refused it to its reason, `applied` and
    `kept` list the replicas that took it and those that kept their previous weights, and
    `unknown` those whose outcome this rank could not learn (a rank died or stalled);
    `version` counts the updates (1 for the first sync). All empty for a setup error.
    """

    def __init__(
        self,
        message: str,
        *,
        refused: dict[int, str] | None = None,
        applied: Sequence[int] = (),
        kept: Sequence[int] = (),
        unknown: Sequence[int] = (),
        version: int = 0,
    ) -> None:
        super().__init__(message)
        self.refused: dict[int, str] = dict(refused or {})
        self.applied: list[int] = list(applied)
        self.kept: list[int] = list(kept)
        self.unknown: list[int] = list(unknown)
        self.version = version
