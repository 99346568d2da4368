"""theseus-transport: move a task vector between models of different widths without training."""

from .transport import (
    LayerMap,
    TransportPlan,
    TransportReport,
    TransportResult,
    apply_task_vector,
    build_plan,
    load_task_vector,
    save_task_vector,
    task_vector_from_models,
    transport,
)

__version__ = "0.1.0"

__all__ = [
    "LayerMap",
    "TransportPlan",
    "TransportReport",
    "TransportResult",
    "apply_task_vector",
    "build_plan",
    "load_task_vector",
    "save_task_vector",
    "task_vector_from_models",
    "transport",
]
