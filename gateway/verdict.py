"""The statistics of an experiment: is the split what was asked, how does each arm differ from
control, and may anyone act on it yet.

- **Sample ratio mismatch**: Pearson's chi-squared test of the exposures against the weights
  (`scipy.stats.chisquare`), flagged at p < 0.001, as experimentation platforms do (Fabijan et al.,
  "Diagnosing Sample Ratio Mismatch in Online Controlled Experiments", KDD 2019).
- **Difference from control**: the difference of means (a positive rate is the mean of 0/1
  outcomes), with a fixed-horizon normal confidence interval (`scipy.stats.norm`) for reading, and
- **an always-valid confidence sequence** for deciding: the normal-mixture sequential probability
  ratio test (mSPRT) of Johari, Koomen, Pekelis and Walsh, "Peeking at A/B Tests: Why it matters, and
  what to do about it" (KDD 2017) and "Always Valid Inference: Continuous Monitoring of A/B Tests"
  (Operations Research, 2022), with the mixing distribution N(0, tau^2). With V the variance of the
  estimated difference, its interval is

      diff +- sqrt( V (V + tau^2) / tau^2 * ( 2 log(1/alpha) + log((V + tau^2) / V) ) )

  and holds at every sample size at once, so results may be read (and acted on) after every event
  without inflating false positives beyond alpha. A verdict uses this interval only; the fixed-horizon
  one is shown, never acted on.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from scipy import stats

SRM_P = 0.001
Verdict = Literal["keep running", "winner", "no detectable difference", "sample ratio mismatch"]


@dataclass(frozen=True)
class Sample:
    """One arm's outcomes for one metric: how many, their sum and their sum of squares."""

    n: int
    total: float
    squares: float

    @property
    def mean(self) -> float:
        return self.total / self.n if self.n else 0.0

    @property
    def variance(self) -> float:
        """The (unbiased) variance of one outcome; a floor keeps all-0 or all-1 arms from claiming certainty."""
        if self.n < 2:
            return 0.25
        raw = (self.squares - self.total * self.total / self.n) / (self.n - 1)
        return max(raw, 1e-6)


@dataclass(frozen=True)
class Difference:
    arm: str
    diff: float
    """Arm mean minus control mean."""
    fixed_low: float
    fixed_high: float
    """Fixed-horizon interval (for reading only)."""
    low: float
    high: float
    """Always-valid interval (the one decisions use)."""

    @property
    def significant(self) -> bool:
        return self.low > 0 or self.high < 0


def sample_ratio_mismatch(exposures: Sequence[int], weights: Sequence[float]) -> float:
    """The chi-squared p-value of the exposures against the weights (1.0 when there is nothing to test)."""
    live = [(seen, weight) for seen, weight in zip(exposures, weights, strict=True) if weight > 0]
    total = sum(seen for seen, _ in live)
    if len(live) < 2 or total == 0:
        return 1.0
    scale = sum(weight for _, weight in live)
    expected = [total * weight / scale for _, weight in live]
    return float(stats.chisquare([seen for seen, _ in live], expected).pvalue)


def mean_interval(sample: Sample, alpha: float) -> tuple[float, float]:
    """A fixed-horizon normal interval of one arm's mean at level 1 - alpha (unbounded below 2 samples)."""
    if sample.n < 2:
        return -math.inf, math.inf
    half = float(stats.norm.ppf(1 - alpha / 2)) * math.sqrt(sample.variance / sample.n)
    return sample.mean - half, sample.mean + half


def difference(arm: str, sample: Sample, control: Sample, alpha: float, tau: float) -> Difference:
    """The arm's difference from control, with both intervals at level 1 - alpha; `tau` is the mixture's
    standard deviation (the size of effect the test is tuned to find)."""
    diff = sample.mean - control.mean
    if sample.n < 2 or control.n < 2:
        return Difference(arm, diff, -math.inf, math.inf, -math.inf, math.inf)
    v = sample.variance / sample.n + control.variance / control.n
    z = float(stats.norm.ppf(1 - alpha / 2))
    fixed = z * math.sqrt(v)
    always = _always_valid_half_width(v, alpha, tau)
    return Difference(arm, diff, diff - fixed, diff + fixed, diff - always, diff + always)


def _always_valid_half_width(v: float, alpha: float, tau: float) -> float:
    """Half the width of the normal-mixture mSPRT's always-valid interval of an estimate of variance `v`."""
    tau2 = tau * tau
    return math.sqrt(v * (v + tau2) / tau2 * (2 * math.log(1 / alpha) + math.log((v + tau2) / v)))


def share_lower_bound(count: int, n: int, alpha: float, tau: float) -> float:
    """An always-valid lower bound of a share (count of n), at 1 - alpha however often it is looked at: the
    mSPRT's interval, with a share's largest variance (1/4), so that 20 of 20 is not certainty."""
    if n < 1:
        return -math.inf
    return count / n - _always_valid_half_width(0.25 / n, alpha, tau)


def verdict(
    control: str,
    differences: list[Difference],
    srm_p: float,
    enough: bool,
    smallest_effect: float,
    higher_is_better: bool = True,
) -> tuple[Verdict, str | None]:
    """What the numbers allow, and the winning arm if there is one.

    - "sample ratio mismatch": the split is not what was asked; nothing else can be trusted;
    - "keep running": not `enough` samples yet, or no interval decides;
    - "winner": the arm whose always-valid interval is entirely on the better side of control (the best
      of them), or control when every arm is significantly worse;
    - "no detectable difference": every always-valid interval lies within +-smallest_effect.
    """
    if srm_p < SRM_P:
        return "sample ratio mismatch", None
    if not enough:
        return "keep running", None
    sign = 1 if higher_is_better else -1
    better = [d for d in differences if d.significant and sign * d.diff > 0]
    if better:
        return "winner", max(better, key=lambda d: sign * d.diff).arm
    if differences and all(d.significant and sign * d.diff < 0 for d in differences):
        return "winner", control
    if differences and all(-smallest_effect < d.low and d.high < smallest_effect for d in differences):
        return "no detectable difference", None
    return "keep running", None
