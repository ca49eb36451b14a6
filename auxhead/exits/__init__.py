"""Early exits: answer each sample from the first auxiliary head that is confident enough, and
skip the rest of the network for it.

`EarlyExit` wraps an `AuxModel` and routes; `EarlyExit.calibrate` (a bound on the accuracy
drop) and `EarlyExit.calibrate_budget` (a compute budget) choose its thresholds on held-out
data and return an `ExitSummary`. The same choice from scores cached once, without running the
model (`choose_thresholds`, `choose_budget_thresholds` with a `flop_profile`), the routing rule
on scores (`exit_indices`) and the FLOPs and parameters of each exit (`exit_flops`,
`exit_params`) are public too, and `exit_timing`: where an exit would save wall-clock on this
machine, the model timed up to each candidate tap.
"""

from auxhead.exits._calibrate import (
    Calibration,
    check_targets,
    choose_budget_thresholds,
    choose_thresholds,
)
from auxhead.exits._early import EarlyExit
from auxhead.exits._flops import FlopProfile, exit_flops, exit_params, flop_profile
from auxhead.exits._patience import PatienceChoice, choose_patience, patience_exits
from auxhead.exits._route import CRITERIA, confidence, entropy_confidence, exit_indices
from auxhead.exits._summary import ExitSummary
from auxhead.exits._timing import ExitTiming, TapTiming, exit_timing

__all__ = [
    "CRITERIA",
    "Calibration",
    "EarlyExit",
    "ExitSummary",
    "ExitTiming",
    "FlopProfile",
    "PatienceChoice",
    "TapTiming",
    "check_targets",
    "choose_budget_thresholds",
    "choose_patience",
    "choose_thresholds",
    "confidence",
    "entropy_confidence",
    "exit_flops",
    "exit_indices",
    "exit_params",
    "exit_timing",
    "flop_profile",
    "patience_exits",
]
