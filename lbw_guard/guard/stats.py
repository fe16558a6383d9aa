"""Running statistics with warm-up, from which spike thresholds are z-scores.

Training signals trend (the loss falls, the grad norm drifts), so a plain mean/variance
over a window mistakes the trend for noise and stops seeing spikes. Each statistic keeps a
fast *level* that follows the trend and a slow variance of the one-step *innovations*
``x - level``: a spike is an innovation many standard deviations above the level.

The controller scores a value *before* folding it in, and folds in only accepted values,
clamped to a few standard deviations: a rejected spike never widens the threshold that
rejected it, and an accepted outlier moves the statistic only boundedly.
"""

from __future__ import annotations

import math


class EmaStat:
    """Level (fast EMA) and innovation variance (slow EMA) of one scalar signal.

    For the first samples the weights are 1/n (plain running averages), so early values
    count equally; afterwards the EMA factors apply. Scores are 0 until ``warmup`` samples.
    """

    def __init__(self, beta: float, warmup: int, min_std: float, winsor_z: float,
                 relative_std: bool = False, level_beta: float = 0.8):
        self.beta = beta
        self.level_beta = level_beta
        self.warmup = warmup
        self.min_std = min_std
        self.winsor_z = winsor_z
        self.relative_std = relative_std  # min_std is a fraction of |level| (the loss's scale varies)
        self.count = 0
        self.mean = 0.0  # the level
        self.var = 0.0  # of innovations

    @property
    def warm(self) -> bool:
        return self.count >= self.warmup

    def std(self) -> float:
        floor = self.min_std * abs(self.mean) if self.relative_std else self.min_std
        spread = math.sqrt(self.var) if math.isfinite(self.var) and self.var > 0 else 0.0
        return max(spread, floor, 1e-12) if math.isfinite(floor) else max(spread, 1e-12)

    def z(self, x: float) -> float:
        """z-score of x against the statistic; 0 before warm-up, +inf for a non-finite x."""
        if not math.isfinite(x):
            return math.inf
        if not self.warm:
            return 0.0
        return (x - self.mean) / self.std()

    def upper(self, z: float) -> float:
        """The value whose z-score is z (inf before warm-up)."""
        if not self.warm:
            return math.inf
        return self.mean + z * self.std()

    def update(self, x: float) -> None:
        if not math.isfinite(x):
            return
        if self.count == 0:
            self.count, self.mean, self.var = 1, x, 0.0
            return
        if self.warm:  # winsorise: an accepted but large value moves the statistic boundedly
            bound = self.winsor_z * self.std()
            x = min(max(x, self.mean - bound), self.mean + bound)
        innovation = x - self.mean
        square = innovation * innovation
        if not math.isfinite(square):  # a finite value too far out to square: not a statistic
            return
        self.count += 1
        w_var = max(1.0 / (self.count - 1), 1.0 - self.beta)
        w_level = max(1.0 / self.count, 1.0 - self.level_beta)
        self.var += w_var * (square - self.var)
        self.mean += w_level * innovation

    def reset(self) -> None:
        self.count = 0
        self.mean = 0.0
        self.var = 0.0

    def state_dict(self) -> dict:
        return {"count": self.count, "mean": self.mean, "var": self.var}

    def load_state_dict(self, state: dict) -> None:
        self.count = int(state["count"])
        self.mean = float(state["mean"])
        self.var = float(state["var"])


def safe_log(x: float) -> float:
    """log for positive signals; non-finite stays non-finite, zero maps far below any data."""
    if not math.isfinite(x):
        return math.inf if x > 0 or math.isnan(x) else -math.inf
    return math.log(max(x, 1e-300))
