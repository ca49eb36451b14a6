"""auxhead: auxiliary classifiers for any PyTorch model.

Attach heads at named layers (`attach`), add their losses (`AuxLoss`), strip them for
inference (`AuxModel.strip`). fastai support lives in `auxhead.fastai`.
"""

from auxhead._probe import LayerInfo, LayerTable, list_layers
from auxhead.attach import AttachError, AuxModel, attach
from auxhead.dense import deep_supervision_weights, match_size
from auxhead.distributed import check_ddp
from auxhead.exits import EarlyExit, ExitSummary, exit_flops
from auxhead.heads import (
    HEAD_KINDS,
    Conv1x1Head,
    FCNHead,
    InceptionHead,
    LinearHead,
    SDNHead,
    build_head,
)
from auxhead.losses import AuxLoss, MultiLoss, distillation_loss
from auxhead.schedules import (
    SCHEDULES,
    constant,
    cosine,
    get_schedule,
    linear_decay,
    linear_ramp,
)

__version__ = "0.1.0"

__all__ = [
    "HEAD_KINDS",
    "SCHEDULES",
    "AttachError",
    "AuxLoss",
    "AuxModel",
    "Conv1x1Head",
    "EarlyExit",
    "ExitSummary",
    "FCNHead",
    "InceptionHead",
    "LayerInfo",
    "LayerTable",
    "LinearHead",
    "MultiLoss",
    "SDNHead",
    "attach",
    "build_head",
    "check_ddp",
    "constant",
    "cosine",
    "deep_supervision_weights",
    "distillation_loss",
    "exit_flops",
    "get_schedule",
    "linear_decay",
    "linear_ramp",
    "list_layers",
    "match_size",
]
