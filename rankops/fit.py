"""Scaling-law fits for the decomposition's terms (docs/DESIGN.md, "Power laws").

The paper's fit (Zhan et al., "What Scales in Cross-Entropy Scaling Law?", arXiv 2510.04067):
for a metric M over models of X non-embedding parameters, ordinary least squares on

    log M = a + b log X        (natural logs; alpha = -b, R^2 in log space)

and the scaling difference |alpha_M - alpha_CE|. Terms that can be negative (Conf) are fitted
on log|M| with ``log_abs=True``, and the fit says so.

Beyond the paper:
- the saturating form M = E + A X^-alpha, fitted as in Hoffmann et al. ("Training
  Compute-Optimal Large Language Models", arXiv 2203.15556, approach 3): a Huber loss on log
  residuals, minimised by L-BFGS-B from a grid of starting points, the best kept;
- case-resampling bootstrap with percentile intervals (Efron & Tibshirani, "An Introduction to
  the Bootstrap", 1993, ch. 13);
- leave-largest-out extrapolation: fit without the largest model, predict it.

A fitter, for `bootstrap` and `leave_largest_out`, is any callable ``fitter(x, y)`` returning a
fit with ``.params`` (a dict of floats) and ``.predict(x)``: `fit_power_law`, `fit_saturating`,
or a ``functools.partial`` of either.

>>> import numpy as np
>>> x = np.array([7e7, 1.6e8, 4.1e8, 1.0e9, 2.8e9, 6.9e9])
>>> fit = fit_power_law(x, 9.0 * x ** -0.12, name="EE")
>>> fit
PowerLawFit(EE: M ~ 9.0e+00 * X^-0.120, alpha=0.120 ± 0.000, R^2=1.000, n=6)
>>> round(fit.alpha, 6), round(float(fit.predict(1e10)), 6)
(0.12, 0.567862)
"""
import functools
import math
import warnings
from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "BootstrapResult",
    "LeaveLargestOut",
    "PowerLawFit",
    "RankopsFitWarning",
    "SaturatingFit",
    "bootstrap",
    "fit_power_law",
    "fit_saturating",
    "leave_largest_out",
    "scaling_difference",
]


class RankopsFitWarning(UserWarning):
    """A fit that ran but deserves doubt: too few points for its parameters, y changing sign."""


# ---------------------------------------------------------------------------------------------
# Input checks


def _as_1d(v, name: str) -> np.ndarray:
    arr = np.array(v, dtype=np.float64)  # a copy: the fit keeps its own, read-only
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    return arr


def _check_xy(x, y, *, log_abs: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """float64 copies of x and y, or a ValueError naming the argument at fault."""
    x = _as_1d(x, "x")
    y = _as_1d(y, "y")
    if x.size != y.size:
        raise ValueError(f"x and y must have the same length, got {x.size} and {y.size}")
    if x.size < 2:
        raise ValueError(f"need at least 2 points (x, y) to fit, got {x.size}")
    for name, v in (("x", x), ("y", y)):
        bad = np.flatnonzero(~np.isfinite(v))
        if bad.size:
            raise ValueError(f"{name} must be finite, got {name}[{bad[0]}] = {v[bad[0]]}")
    bad = np.flatnonzero(x <= 0)
    if bad.size:
        raise ValueError(f"x must be > 0 (the fit is in log x), got x[{bad[0]}] = {x[bad[0]]}")
    if log_abs:
        bad = np.flatnonzero(y == 0)
        if bad.size:
            raise ValueError(f"y must be nonzero even with log_abs=True (log|y| of 0 is -inf), "
                             f"got y[{bad[0]}] = 0")
    else:
        bad = np.flatnonzero(y <= 0)
        if bad.size:
            raise ValueError(f"y must be > 0 (the fit is in log y), got y[{bad[0]}] = {y[bad[0]]}; "
                             f"for a term that can be negative (Conf) pass log_abs=True to fit "
                             f"log|y|")
    if np.unique(x).size < 2:
        raise ValueError(f"x must hold at least 2 distinct values, got only {x[0]}")
    x.setflags(write=False)
    y.setflags(write=False)
    return x, y


def _warn_few_points(n_points: int, n_params: int, what: str) -> None:
    # n <= p + 1 leaves at most one residual degree of freedom: the fit is (nearly) an
    # interpolation and its R^2 and standard errors say little or nothing.
    if n_points <= n_params + 1:
        dof = n_points - n_params
        warnings.warn(f"{what}: {n_points} points for {n_params} parameters leave {max(dof, 0)} "
                      f"residual degree(s) of freedom; too few points to judge the fit",
                      RankopsFitWarning, stacklevel=3)


def _fmt_pm(se: float) -> str:
    return "nan" if not math.isfinite(se) else f"{se:.3f}"


# ---------------------------------------------------------------------------------------------
# The paper's fit: ordinary least squares in log-log space


class _Refittable:
    """What follows from a fit by refitting its points: bootstrap intervals and the
    leave-largest-out extrapolation error. Subclasses say how to refit (_fitter)."""

    def bootstrap(self, n_resamples: int = 1000, confidence: float = 0.95,
                  seed: int = 0) -> "BootstrapResult":
        """Percentile intervals for every parameter by resampling the points; see `bootstrap`."""
        return bootstrap(self.x, self.y, self._fitter(), n_resamples=n_resamples,
                         confidence=confidence, seed=seed)

    def leave_largest_out(self) -> "LeaveLargestOut":
        """Refit without the largest x and predict it; see `leave_largest_out`."""
        return leave_largest_out(self.x, self.y, self._fitter())


@dataclass(frozen=True, repr=False, eq=False)
class PowerLawFit(_Refittable):
    """log M = a + b log X by ordinary least squares (natural logs); alpha = -b.

    With log_abs=True the fit is of log|M|; ``sign`` is the common sign of y (+1 or -1, 0 when y
    changes sign) and `predict` returns sign * |M| (just |M| when the sign changes).
    Standard errors are the usual OLS ones with n - 2 residual degrees of freedom (NaN at n = 2).
    """
    a: float
    b: float
    se_a: float
    se_b: float
    r_squared: float
    n_points: int
    x: np.ndarray = field(repr=False)
    y: np.ndarray = field(repr=False)
    name: str | None = None
    log_abs: bool = False
    sign: int = 1

    @property
    def alpha(self) -> float:
        """The scaling exponent, -b: M ~ X^-alpha."""
        return -self.b

    @property
    def se_alpha(self) -> float:
        """Standard error of alpha (that of b)."""
        return self.se_b

    @property
    def coefficient(self) -> float:
        """exp(a): M ~ coefficient * X^b (|M| with log_abs)."""
        return math.exp(self.a)

    @property
    def params(self) -> dict:
        """The fitted parameters by name, as `bootstrap` resamples them."""
        return {"a": self.a, "b": self.b, "alpha": self.alpha}

    @property
    def log_residuals(self) -> np.ndarray:
        """log|y| - (a + b log x), per point."""
        return np.log(np.abs(self.y)) - (self.a + self.b * np.log(self.x))

    def predict(self, x) -> np.ndarray:
        """M at x (sign * |M| with log_abs; |M| when y changed sign)."""
        x = np.asarray(x, dtype=np.float64)
        return (self.sign or 1) * np.exp(self.a + self.b * np.log(x))

    def _fitter(self):
        return functools.partial(fit_power_law, name=self.name, log_abs=self.log_abs)

    def __repr__(self) -> str:
        label = f"{self.name}: " if self.name else ""
        m = "|M|" if self.log_abs else "M"
        note = ", fitted on log|M|" if self.log_abs else ""
        return (f"PowerLawFit({label}{m} ~ {self.coefficient:.1e} * X^{self.b:.3f}, "
                f"alpha={self.alpha:.3f} ± {_fmt_pm(self.se_alpha)}, R^2={self.r_squared:.3f}, "
                f"n={self.n_points}{note})")


def fit_power_law(x, y, *, name: str | None = None, log_abs: bool = False) -> PowerLawFit:
    """Fit log M = a + b log X by ordinary least squares, as the paper does (arXiv 2510.04067).

    Args:
        x: [n] model sizes (non-embedding parameters), > 0.
        y: [n] the metric at each size, > 0; with log_abs=True any nonzero values, and the fit
            is of log|y| (for terms that can be negative, like Conf).
        name: a label for the repr, e.g. "EE".

    Warns RankopsFitWarning when n <= 3 (at most one residual degree of freedom); at n = 2 the
    standard errors are NaN.

    >>> import numpy as np
    >>> x = np.array([1e7, 1e8, 1e9, 1e10])
    >>> fit = fit_power_law(x, -2.0 * x ** -0.05, log_abs=True)  # e.g. Conf, negative
    >>> fit
    PowerLawFit(|M| ~ 2.0e+00 * X^-0.050, alpha=0.050 ± 0.000, R^2=1.000, n=4, fitted on log|M|)
    >>> float(fit.predict(1e10)) < 0
    True
    """
    x, y = _check_xy(x, y, log_abs=log_abs)
    n = x.size
    _warn_few_points(n, 2, "fit_power_law")
    lx = np.log(x)
    ly = np.log(np.abs(y))
    # Centered sums: the same estimates as the normal equations, without their cancellation.
    mx, my = lx.mean(), ly.mean()
    dx, dy = lx - mx, ly - my
    sxx = float(dx @ dx)
    b = float(dx @ dy) / sxx
    a = float(my - b * mx)
    resid = ly - (a + b * lx)
    ss_res = float(resid @ resid)
    ss_tot = float(dy @ dy)
    r_squared = 1.0 - ss_res / ss_tot if ss_tot > 0 else float("nan")
    if n > 2:
        sigma2 = ss_res / (n - 2)
        se_b = math.sqrt(sigma2 / sxx)
        se_a = math.sqrt(sigma2 * (1.0 / n + mx * mx / sxx))
    else:
        se_a = se_b = float("nan")
    sign = 1
    if log_abs:
        if (y > 0).all():
            sign = 1
        elif (y < 0).all():
            sign = -1
        else:
            sign = 0
            warnings.warn("fit_power_law: y changes sign, and |y| cannot follow one power law "
                          "through zero; predict() returns |M|", RankopsFitWarning, stacklevel=2)
    return PowerLawFit(a=a, b=b, se_a=se_a, se_b=se_b, r_squared=r_squared, n_points=n, x=x, y=y,
                       name=name, log_abs=log_abs, sign=sign)


def scaling_difference(fit_m: PowerLawFit, fit_ce: PowerLawFit) -> float:
    """The paper's scaling difference |alpha_M - alpha_CE| (arXiv 2510.04067).

    Both fits must be power-law fits over the same model sizes (the same x, in any order).

    >>> import numpy as np
    >>> x = np.array([1e7, 1e8, 1e9, 1e10])
    >>> ee, ce = fit_power_law(x, 5 * x ** -0.3), fit_power_law(x, 4 * x ** -0.1)
    >>> round(scaling_difference(ee, ce), 12)
    0.2
    """
    for arg, f in (("fit_m", fit_m), ("fit_ce", fit_ce)):
        if not isinstance(f, PowerLawFit):
            raise TypeError(f"{arg} must be a PowerLawFit (from fit_power_law), got "
                            f"{type(f).__name__}")
    if fit_m.x.size != fit_ce.x.size or not np.array_equal(np.sort(fit_m.x), np.sort(fit_ce.x)):
        raise ValueError(f"fit_m and fit_ce must be fitted on the same x (model sizes), got "
                         f"{fit_m.n_points} and {fit_ce.n_points} points with different sizes")
    return abs(fit_m.alpha - fit_ce.alpha)


# ---------------------------------------------------------------------------------------------
# Saturating form M = E + A X^-alpha: Huber loss on log residuals, L-BFGS-B from a grid


@dataclass(frozen=True, repr=False, eq=False)
class SaturatingFit(_Refittable):
    """M = E + A X^-alpha, minimising sum Huber_delta(log y - log(E + A X^-alpha)).

    E lies in [0, min(y)), A > 0, alpha > 0. loss is the minimised sum; converged is whether
    L-BFGS-B reported success for the best start; n_starts is how many starts were run.
    """
    E: float
    A: float
    alpha: float
    loss: float
    n_points: int
    converged: bool
    x: np.ndarray = field(repr=False)
    y: np.ndarray = field(repr=False)
    name: str | None = None
    huber_delta: float = 1e-3
    n_starts: int = 0

    @property
    def params(self) -> dict:
        """The fitted parameters by name, as `bootstrap` resamples them."""
        return {"E": self.E, "A": self.A, "alpha": self.alpha}

    @property
    def log_residuals(self) -> np.ndarray:
        """log y - log(E + A x^-alpha), per point."""
        return np.log(self.y) - np.log(self.predict(self.x))

    @property
    def r_squared(self) -> float:
        """1 - SS_res / SS_tot in log space, comparable with `PowerLawFit.r_squared`."""
        ly = np.log(self.y)
        dy = ly - ly.mean()
        r = self.log_residuals
        ss_tot = float(dy @ dy)
        return 1.0 - float(r @ r) / ss_tot if ss_tot > 0 else float("nan")

    def predict(self, x) -> np.ndarray:
        """E + A x^-alpha."""
        x = np.asarray(x, dtype=np.float64)
        return self.E + self.A * np.exp(-self.alpha * np.log(x))

    def _fitter(self):
        return functools.partial(fit_saturating, name=self.name, n_starts=self.n_starts,
                                 huber_delta=self.huber_delta)

    def __repr__(self) -> str:
        label = f"{self.name}: " if self.name else ""
        note = "" if self.converged else ", not converged"
        return (f"SaturatingFit({label}M ~ {self.E:.4g} + {self.A:.3e} * X^-{self.alpha:.3f}, "
                f"loss={self.loss:.2e}, n={self.n_points}{note})")


def _huber_objective(theta, u, ly, delta):
    """Sum of Huber(log y - log(E + exp(c - alpha u))) and its gradient in (E, c, alpha).

    u = log x - mean(log x) and c = log A - alpha mean(log x): centering decouples c from alpha,
    which in (log A, alpha) are correlated through the large mean of log x.
    """
    E, c, alpha = theta
    t = np.exp(c - alpha * u)  # A x^-alpha
    m = E + t
    r = ly - np.log(m)
    abs_r = np.abs(r)
    loss = np.where(abs_r <= delta, 0.5 * r * r, delta * (abs_r - 0.5 * delta)).sum()
    psi = np.clip(r, -delta, delta)  # dHuber/dr
    w = psi / m
    grad = np.array([-w.sum(), -(w * t).sum(), (w * t * u).sum()])
    return float(loss), grad


def _start_grid(n_starts: int) -> tuple[np.ndarray, np.ndarray]:
    """(E fractions of min y, alpha values), about n_starts combinations in all."""
    n_e = max(1, min(n_starts, round(math.sqrt(n_starts / 2))))
    n_alpha = max(1, math.ceil(n_starts / n_e))
    # E starts crowd towards min(y): that is where a saturating law is hard to reach from below.
    e_frac = 1.0 - np.geomspace(1.0, 0.01, n_e) if n_e > 1 else np.zeros(1)
    e_frac[0] = 0.0
    alphas = np.geomspace(0.02, 2.0, n_alpha) if n_alpha > 1 else np.array([0.3])
    return e_frac, alphas


def fit_saturating(x, y, *, name: str | None = None, n_starts: int = 24,
                   huber_delta: float = 1e-3) -> SaturatingFit:
    """Fit M = E + A X^-alpha by a Huber loss on log residuals (Hoffmann et al., arXiv 2203.15556).

    L-BFGS-B runs from a grid of about n_starts starting points over (E, alpha), A at each start
    set by least squares of log(y - E) on log x with that alpha; the lowest loss wins. Bounds:
    0 <= E <= min(y) (1 - 1e-9), A > 0, 0 < alpha <= 10. huber_delta = 1e-3 as in Hoffmann et al.
    Warns RankopsFitWarning when n <= 4 (3 parameters). Needs scipy.

    >>> import numpy as np
    >>> x = np.geomspace(1e5, 1e9, 8)
    >>> fit = fit_saturating(x, 1.7 + 40.0 * x ** -0.35, name="CE")
    >>> fit  # doctest: +ELLIPSIS
    SaturatingFit(CE: M ~ 1.7 + 4.000e+01 * X^-0.350, loss=..., n=8)
    """
    try:
        from scipy.optimize import minimize
    except ImportError as e:  # pragma: no cover - scipy is present wherever the tests run
        raise ImportError("fit_saturating needs scipy (pip install scipy)") from e
    if n_starts < 1:
        raise ValueError(f"n_starts must be >= 1, got {n_starts}")
    if not huber_delta > 0:
        raise ValueError(f"huber_delta must be > 0, got {huber_delta}")
    x, y = _check_xy(x, y)
    n = x.size
    _warn_few_points(n, 3, "fit_saturating")
    # Log residuals are scale-free: fit y / min(y), so E's bound is (1 - 1e-9) whatever y's units.
    scale = float(y.min())
    lx = np.log(x)
    lx0 = float(lx.mean())
    u = lx - lx0
    ly = np.log(y / scale)
    e_max = 1.0 - 1e-9
    bounds = [(0.0, e_max), (-200.0, 200.0), (1e-9, 10.0)]

    e_frac, alphas = _start_grid(n_starts)
    best = None
    n_run = 0
    for ef in e_frac:
        e0 = ef * e_max
        lres = np.log(np.exp(ly) - e0)  # log(y - E0) > log(1e-9), finite
        for a0 in alphas:
            c0 = float(np.mean(lres + a0 * u))  # least squares for c at this (E0, alpha0)
            c0 = min(max(c0, -200.0), 200.0)
            res = minimize(_huber_objective, np.array([e0, c0, a0]), args=(u, ly, huber_delta),
                           jac=True, method="L-BFGS-B", bounds=bounds,
                           options={"maxiter": 2000, "ftol": 1e-15, "gtol": 1e-12})
            n_run += 1
            if best is None or res.fun < best.fun:
                best = res
    E, c, alpha = (float(v) for v in best.x)
    A = math.exp(c + alpha * lx0) * scale
    # A start whose loss stayed infinite (or NaN) found nothing, whatever the optimiser says.
    converged = bool(best.success) and math.isfinite(float(best.fun))
    if not converged:
        warnings.warn(f"fit_saturating{'' if name is None else f' ({name})'} did not converge "
                      f"(loss {float(best.fun):.3g}): the fitted values are not a minimum",
                      RankopsFitWarning, stacklevel=2)
    return SaturatingFit(E=E * scale, A=A, alpha=alpha, loss=float(best.fun), n_points=n,
                         converged=converged, x=x, y=y, name=name,
                         huber_delta=huber_delta, n_starts=n_run)


# ---------------------------------------------------------------------------------------------
# Bootstrap


@dataclass(frozen=True, repr=False, eq=False)
class BootstrapResult:
    """Case-resampling bootstrap of a fit: per-parameter samples and percentile intervals.

    samples maps each parameter name to its [n_used] resampled values; estimate to the fit on
    all points. n_degenerate resamples had < 2 distinct x and were skipped; n_failed raised
    in the fitter and were skipped; n_used = n_resamples - n_degenerate - n_failed.
    """
    estimate: dict
    samples: dict = field(repr=False)
    confidence: float
    n_resamples: int
    n_used: int
    n_degenerate: int
    n_failed: int
    seed: int

    def interval(self, param: str) -> tuple[float, float]:
        """The percentile interval (lo, hi) for one parameter at this confidence."""
        if param not in self.samples:
            raise KeyError(f"no parameter {param!r}; the fit has {sorted(self.samples)}")
        s = self.samples[param]
        if s.size == 0:
            return float("nan"), float("nan")
        tail = (1.0 - self.confidence) / 2.0
        lo, hi = np.quantile(s, [tail, 1.0 - tail])
        return float(lo), float(hi)

    @property
    def intervals(self) -> dict:
        """{param: (lo, hi)} for every parameter."""
        return {p: self.interval(p) for p in self.samples}

    def standard_error(self, param: str) -> float:
        """The bootstrap standard error (sample standard deviation) of one parameter."""
        s = self.samples[param]
        return float(np.std(s, ddof=1)) if s.size > 1 else float("nan")

    def __repr__(self) -> str:
        lines = [f"BootstrapResult({self.confidence:.0%} percentile intervals, "
                 f"{self.n_used}/{self.n_resamples} resamples used, "
                 f"{self.n_degenerate} degenerate, {self.n_failed} failed, seed={self.seed})"]
        for p in self.samples:
            lo, hi = self.interval(p)
            lines.append(f"  {p:<6} {self.estimate[p]:>11.4g}  [{lo:.4g}, {hi:.4g}]")
        return "\n".join(lines)


def bootstrap(x, y, fitter=fit_power_law, *, n_resamples: int = 1000, confidence: float = 0.95,
              seed: int = 0) -> BootstrapResult:
    """Case-resampling bootstrap: refit on n points drawn with replacement, n_resamples times.

    Percentile intervals for every parameter in ``fitter(x, y).params`` (Efron & Tibshirani
    1993, ch. 13). Resamples with fewer than 2 distinct x are skipped and counted
    (n_degenerate); so are resamples whose fit raises (n_failed). Deterministic given seed
    (numpy default_rng). RankopsFitWarnings from resampled fits are silenced.

    >>> import numpy as np
    >>> rng = np.random.default_rng(1)
    >>> x = np.geomspace(1e7, 1e10, 12)
    >>> y = 5.0 * x ** -0.2 * np.exp(rng.normal(0, 0.02, x.size))
    >>> res = bootstrap(x, y, fit_power_law, n_resamples=200, seed=0)
    >>> lo, hi = res.interval("alpha"); bool(lo < 0.2 < hi)
    True
    """
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    full = fitter(x, y)  # validates x and y, and is the point estimate
    x, y = np.asarray(full.x), np.asarray(full.y)
    n = x.size
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_resamples, n))  # all draws up front: seed fixes every resample
    samples = {p: [] for p in full.params}
    n_degenerate = n_failed = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RankopsFitWarning)
        for i in range(n_resamples):
            xi, yi = x[idx[i]], y[idx[i]]
            if np.unique(xi).size < 2:
                n_degenerate += 1
                continue
            try:
                p = fitter(xi, yi).params
            except (ValueError, ArithmeticError):
                n_failed += 1
                continue
            for k in samples:
                samples[k].append(p[k])
    samples = {k: np.asarray(v, dtype=np.float64) for k, v in samples.items()}
    n_used = n_resamples - n_degenerate - n_failed
    return BootstrapResult(estimate=dict(full.params), samples=samples, confidence=confidence,
                           n_resamples=n_resamples, n_used=n_used, n_degenerate=n_degenerate,
                           n_failed=n_failed, seed=seed)


# ---------------------------------------------------------------------------------------------
# Leave-largest-out extrapolation


@dataclass(frozen=True, repr=False, eq=False)
class LeaveLargestOut:
    """The fit without the largest x, and how well it predicts the held-out point(s).

    relative_error = (predicted - actual) / |actual|; log_error = log|predicted| - log|actual|.
    Negative: the fit underpredicts. When several points share the largest x, all are held out
    and actual is their mean.
    """
    x_held_out: float
    predicted: float
    actual: float
    n_held_out: int
    fit: object

    @property
    def relative_error(self) -> float:
        return (self.predicted - self.actual) / abs(self.actual)

    @property
    def log_error(self) -> float:
        return math.log(abs(self.predicted)) - math.log(abs(self.actual))

    def __repr__(self) -> str:
        return (f"LeaveLargestOut(X={self.x_held_out:.3g}: predicted {self.predicted:.6g}, "
                f"actual {self.actual:.6g}, relative error {self.relative_error:+.3%}, "
                f"log error {self.log_error:+.4f}, fitted on {self.fit.n_points} points)")


def leave_largest_out(x, y, fitter=fit_power_law) -> LeaveLargestOut:
    """Fit on all points but those at the largest x, and predict the largest x.

    A direct check of extrapolation, the use scaling laws are fitted for. Needs >= 3 points.

    >>> import numpy as np
    >>> x = np.geomspace(1e6, 1e10, 6)
    >>> res = leave_largest_out(x, 1.5 + 30 * x ** -0.3)  # saturating data, pure power law
    >>> res.relative_error < 0  # the log-log line is too steep at the end: it underpredicts
    True
    """
    x = _as_1d(x, "x")
    y = _as_1d(y, "y")
    if x.size != y.size:
        raise ValueError(f"x and y must have the same length, got {x.size} and {y.size}")
    if x.size < 3:
        raise ValueError(f"leave_largest_out needs at least 3 points (2 to fit, 1 to predict), "
                         f"got {x.size}")
    for name, v in (("x", x), ("y", y)):
        if not np.isfinite(v).all():
            bad = np.flatnonzero(~np.isfinite(v))[0]
            raise ValueError(f"{name} must be finite, got {name}[{bad}] = {v[bad]}")
    if (y == 0).any():
        bad = np.flatnonzero(y == 0)[0]
        raise ValueError(f"y must be nonzero (power laws are fitted in log space), got y[{bad}] = 0")
    held = x == x.max()
    fit = fitter(x[~held], y[~held])
    predicted = float(np.asarray(fit.predict(x[held][0])))
    return LeaveLargestOut(x_held_out=float(x.max()), predicted=predicted,
                           actual=float(y[held].mean()), n_held_out=int(held.sum()), fit=fit)
