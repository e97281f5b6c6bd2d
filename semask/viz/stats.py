"""Statistics over seeds: Student-t quantiles and the confidence interval of a mean.

scipy is not a dependency, so `t_quantile` evaluates t's distribution function exactly (a finite sum for integer
degrees of freedom) and inverts it by bisection; `results_table` and `paired_differences` use it for their intervals.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np

from semask.errors import UsageError

__all__ = ["t_quantile", "check_level", "mean_std_interval"]


def _t_central(t: float, df: int) -> float:
    """P(|T| <= t) for Student's t with `df` degrees of freedom (a positive integer).

    For integer df the distribution function is a finite sum (Abramowitz & Stegun 26.7.3-4), with
    theta = atan(t / sqrt(df)): 2 theta / pi for df = 1; (2 / pi) (theta + sin theta (cos theta + 2/3 cos^3 theta
    + ... + (2.4...(df-3)) / (1.3...(df-2)) cos^(df-2) theta)) for odd df; sin theta (1 + 1/2 cos^2 theta + ...
    + (1.3...(df-3)) / (2.4...(df-2)) cos^(df-2) theta) for even df. Exact up to floating-point rounding.
    """
    theta = math.atan(t / math.sqrt(df))
    c2 = math.cos(theta) ** 2
    if df % 2 == 0:
        term = total = 1.0
        for j in range(2, df - 1, 2):
            term *= (j - 1) / j * c2
            total += term
        return math.sin(theta) * total
    if df == 1:
        return 2.0 * theta / math.pi
    term = total = math.cos(theta)
    for j in range(3, df - 1, 2):
        term *= (j - 1) / j * c2
        total += term
    return 2.0 / math.pi * (theta + math.sin(theta) * total)


def t_quantile(p: float, df: int) -> float:
    """The `p`-quantile of Student's t distribution with `df` degrees of freedom (no scipy needed).

    The distribution function is evaluated exactly (a finite sum for integer df) and inverted by bisection to
    double precision: ``t_quantile(0.975, 4)`` = 2.7764..., the 95% two-sided critical value for 5 runs.

    Args:
        p: the probability, 0 < p < 1.
        df: degrees of freedom, a positive int (runs - 1 for the interval of a mean).

    Returns:
        t with P(T <= t) = p (negative for p < 0.5).

    Raises:
        UsageError: p outside (0, 1) or df not a positive int.
    """
    if isinstance(df, bool) or not isinstance(df, (int, np.integer)) or df < 1:
        raise UsageError(f"degrees of freedom must be a positive int, got {df!r}")
    if isinstance(p, bool) or not isinstance(p, (int, float, np.floating)) or not 0.0 < p < 1.0:
        raise UsageError(f"the probability must be a number in (0, 1), got {p!r}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    central = 2.0 * p - 1.0  # P(|T| <= t) at the quantile
    low, high = 0.0, 1.0
    while _t_central(high, int(df)) < central:
        low, high = high, 2.0 * high
    for _ in range(200):  # halves the bracket each time: double precision long before the end
        mid = 0.5 * (low + high)
        if mid in (low, high):
            break
        low, high = (mid, high) if _t_central(mid, int(df)) < central else (low, mid)
    return 0.5 * (low + high)


def check_level(ci: Optional[float]) -> Optional[float]:
    if ci is None:
        return None
    if isinstance(ci, bool) or not isinstance(ci, (int, float, np.floating)) or not 0.0 < ci < 1.0:
        raise UsageError(f"ci must be a confidence level in (0, 1) such as 0.95, or None, got {ci!r}")
    return float(ci)


def mean_std_interval(values: np.ndarray, ci: Optional[float]) -> tuple[float, float, float]:
    """Mean, sample standard deviation (ddof 1) and the half-width of the level-`ci` Student-t interval of the
    mean, t(1 - (1 - ci) / 2, n - 1) std / sqrt(n); NaN where undefined (no values; one value for std and
    interval; no `ci`)."""
    n = values.size
    mean = float(values.mean()) if n else float("nan")
    std = float(values.std(ddof=1)) if n > 1 else float("nan")
    half = t_quantile(0.5 + ci / 2, n - 1) * std / math.sqrt(n) if ci is not None and n > 1 else float("nan")
    return mean, std, half
