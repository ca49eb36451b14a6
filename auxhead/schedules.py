"""Schedules for auxiliary-loss weights: plain functions of training progress t in [0, 1]
returning a multiplier for every head's weight."""

from __future__ import annotations

import math
from collections.abc import Callable

__all__ = [
    "SCHEDULES",
    "Schedule",
    "constant",
    "cosine",
    "get_schedule",
    "linear_decay",
    "linear_ramp",
]

Schedule = Callable[[float], float]


def constant(t: float) -> float:
    """1 throughout (GoogLeNet, Inception v3)."""
    return 1.0


def linear_decay(t: float) -> float:
    """1 at the start, 0 at the end: DSN/CNDS's alpha * (1 - t), the heads fading out."""
    return 1.0 - t


def linear_ramp(t: float) -> float:
    """0 at the start, 1 at the end: SDN's weights growing over training."""
    return t


def cosine(t: float) -> float:
    """Half a cosine from 1 to 0: a softer decay than `linear_decay`."""
    return 0.5 * (1.0 + math.cos(math.pi * t))


SCHEDULES: dict[str, Schedule] = {
    "constant": constant,
    "linear_decay": linear_decay,
    "linear_ramp": linear_ramp,
    "cosine": cosine,
}


def get_schedule(schedule: str | Schedule) -> Schedule:
    """A schedule from its name (see `SCHEDULES`) or a callable t -> float."""
    if isinstance(schedule, str):
        if schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {schedule!r}; choose one of {sorted(SCHEDULES)}")
        return SCHEDULES[schedule]
    if callable(schedule):
        return schedule
    raise TypeError(f"a schedule is a name or a callable t -> float, got {type(schedule).__name__}")
