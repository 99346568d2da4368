"""The transport engine: pure torch, no Lightning."""

from .alignment import TOKEN_ALIGNMENTS, align_tokens, interpolate_tokens_2d
from .engine import (
    ATTENTION_MAPS,
    DEFAULT_ATTENTION_MAPS,
    DEFAULT_MAP_MODE,
    MAP_MODES,
    TransportReport,
    TransportResult,
    apply_task_vector,
    build_plan,
    build_plans,
    collect_statistics,
    measure_alignment,
    task_vector_from_models,
    transport,
)
from .fidelity import measure_update_alignment
from .errors import (
    CalibrationError,
    CorruptFileError,
    DataLayoutError,
    DepthMismatchError,
    FamilyMismatchError,
    HashMismatchError,
    NonFiniteError,
    OfflineError,
    OutputExistsError,
    OutputPathError,
    RunLogError,
    ShapeMismatchError,
    SharedParameterError,
    TaskVectorKeyError,
    TheseusError,
    UnknownNameError,
)
from .io import load_task_vector, save_task_vector, tensors_sha256
from .heads import AttentionLayout, head_block_maps, max_weight_matching
from .layermap import LayerMap, expand_module, expand_state_dict
from .similarity import linear_cka, procrustes_readout_accuracy
from .maps import MapOptions, procrustes
from .methods import METHODS, get_method
from .plan import TransportPlan
from .statistics import CrossStatistics, StatisticsSet, derive_linear_output

__all__ = [name for name in dir() if not name.startswith("_")]
