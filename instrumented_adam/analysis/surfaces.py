"""Loss surfaces that a run describes in its hyperparameters, so that plots can draw contours.

A task whose loss is known in closed form stores it under `LOSS_SURFACE_KEY` (for instance the
linear regression's training MSE as five data moments). The presentation layer evaluates it from
there, without importing the task that wrote it.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

#: The key of a run's hyperparameters that holds its loss surface, when it has one.
LOSS_SURFACE_KEY = "loss_surface"


def quadratic_mse(moments: Mapping[str, float], slope: np.ndarray, intercept: np.ndarray) -> np.ndarray:
    """The linear regression's training MSE at (slope, intercept), from the stored data moments:
    MSE(m, b) = m²·xx + 2mb·x + b² − 2m·xy − 2b·y + yy (means over the training set)."""
    m, b = np.asarray(slope, dtype=float), np.asarray(intercept, dtype=float)
    return (
        m * m * moments["xx"] + 2 * m * b * moments["x"] + b * b
        - 2 * m * moments["xy"] - 2 * b * moments["y"] + moments["yy"]
    )


__all__ = ["LOSS_SURFACE_KEY", "quadratic_mse"]
