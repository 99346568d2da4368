"""Lightning callbacks of theseus-transport (installed as theseus_transport.callbacks)."""

from .steps_to_target import StepsToTarget
from .theseus import TheseusCallback

__all__ = ["StepsToTarget", "TheseusCallback"]
