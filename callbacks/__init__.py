"""Lightning callbacks of theseus-transport (installed as theseus_transport.callbacks)."""

from .steps_to_target import StepsToTarget
from .theseus import TheseusCallback
from .validate_at_start import ValidateAtStart

__all__ = ["StepsToTarget", "TheseusCallback", "ValidateAtStart"]
