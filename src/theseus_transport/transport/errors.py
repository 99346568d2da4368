"""Named errors raised by the transport engine, so callers can tell causes apart."""

from __future__ import annotations


class TheseusError(Exception):
    """Base class of every error the engine raises on bad input."""


class FamilyMismatchError(TheseusError):
    """Source and target models (or a task vector) belong to different families."""


class TaskVectorKeyError(TheseusError):
    """A task-vector key is not a parameter of the source model."""


class ShapeMismatchError(TheseusError):
    """A tensor's shape does not match the model it is meant for."""


class DepthMismatchError(TheseusError):
    """Source and target have different depths and no layer map was given."""


class CalibrationError(TheseusError):
    """Calibration data is empty, unpaired, or produced non-finite activations."""


class CorruptFileError(TheseusError):
    """A safetensors file or its sidecar cannot be read or is truncated."""


class HashMismatchError(TheseusError):
    """A task vector's tensors do not match the sha256 recorded in its sidecar."""


class OutputExistsError(TheseusError, FileExistsError):
    """An output path exists and overwriting was not asked for."""


class OfflineError(TheseusError):
    """A model or dataset needs a download that cannot happen (offline or unreachable)."""


class RunLogError(TheseusError, ValueError):
    """Training runs' logs lack a metric or cannot be compared as asked."""


class OutputPathError(TheseusError, ValueError):
    """An output path the suite cannot write to safely (e.g. a tensor file not named *.safetensors)."""


class SharedParameterError(TheseusError, ValueError):
    """A parameter the transport would update is one tensor with parts of the model it does not transport."""


class NonFiniteError(TheseusError, ValueError):
    """Tensors to be written or used contain NaN or Inf (e.g. a diverged fine-tune)."""


class _PlainKeyError(KeyError):
    """A KeyError whose message prints as written (KeyError itself quotes its argument)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class UnknownNameError(TheseusError, _PlainKeyError):
    """A model, task, dataset, family or method name the suite does not know (also a KeyError)."""


class DataLayoutError(TheseusError, _PlainKeyError):
    """A dataset lacks a split or column the suite needs (also a KeyError)."""
