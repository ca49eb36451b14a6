"""Early exits: answer each sample from the first auxiliary head that is confident enough, and
skip the rest of the network for it.

`EarlyExit` wraps an `AuxModel` and routes; `EarlyExit.calibrate` (a bound on the accuracy
drop) and `EarlyExit.calibrate_budget` (a compute budget) choose its thresholds on held-out
data and return an `ExitSummary`. The same choice from scores cached once, without running the
model (`choose_thresholds`, `choose_budget_thresholds`), the routing rule on scores
(`exit_indices`), and the FLOPs of the exits (`exit_flops`, `flop_profile`) are public too.
"""

from auxhead.exits._calibrate import (
    METHODS,
    Calibration,
    check_budget,
    check_targets,
    choose_budget_thresholds,
    choose_thresholds,
    fit_temperature,
)
from auxhead.exits._early import MODES, EarlyExit
from auxhead.exits._flops import FlopProfile, count_flops, exit_flops, exit_params, flop_profile
from auxhead.exits._route import (
    CRITERIA,
    MAIN,
    Criterion,
    confidence,
    entropy_confidence,
    exit_indices,
)
from auxhead.exits._summary import ExitSummary

__all__ = [
    "CRITERIA",
    "MAIN",
    "METHODS",
    "MODES",
    "Calibration",
    "Criterion",
    "EarlyExit",
    "ExitSummary",
    "FlopProfile",
    "check_budget",
    "check_targets",
    "choose_budget_thresholds",
    "choose_thresholds",
    "confidence",
    "count_flops",
    "entropy_confidence",
    "exit_flops",
    "exit_indices",
    "exit_params",
    "fit_temperature",
    "flop_profile",
]
