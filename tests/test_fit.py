"""Scaling-law fits (rankops.fit): the paper's log-log OLS, the saturating form, bootstrap,
leave-largest-out. Expected values come from the laws that generated the data, or from an
independent implementation (numpy.polyfit, scipy.stats.linregress), never from rankops itself."""
import doctest
import math
import warnings

import numpy as np
import pytest
from scipy import stats

import rankops.fit
from rankops.fit import (BootstrapResult, LeaveLargestOut, PowerLawFit, RankopsFitWarning,
                         SaturatingFit, bootstrap, fit_power_law, fit_saturating,
                         leave_largest_out, scaling_difference)

# The brief's exact law: 6 sizes from 1e4 to 1e7 parameters.
X6 = np.geomspace(1e4, 1e7, 6)
COEF, ALPHA = 7.5, 0.31
# The saturating law: 8 sizes from 1e5 to 1e9. Its power-law part is 0.71 at 1e5 and 0.028 at
# 1e9, i.e. 1.6% of y at the largest size, so E is identifiable but not trivially.
X8 = np.geomspace(1e5, 1e9, 8)
E_TRUE, A_TRUE, ALPHA_SAT = 1.7, 40.0, 0.35


def law(x, coef=COEF, alpha=ALPHA):
    return coef * x ** -alpha


def noisy(x, sigma, seed, coef=COEF, alpha=ALPHA):
    """Multiplicative lognormal noise: log y = log coef - alpha log x + N(0, sigma^2)."""
    z = np.random.default_rng(seed).standard_normal(x.size)
    return law(x, coef, alpha) * np.exp(sigma * z)


# --- the paper's fit: exact recovery ---------------------------------------------------------

def test_power_law_recovers_an_exact_law():
    fit = fit_power_law(X6, law(X6), name="EE")
    assert isinstance(fit, PowerLawFit)
    assert fit.a == pytest.approx(math.log(COEF), abs=1e-10)
    assert fit.b == pytest.approx(-ALPHA, abs=1e-10)
    assert fit.alpha == pytest.approx(ALPHA, abs=1e-10)
    assert fit.coefficient == pytest.approx(COEF, rel=1e-10)
    assert fit.r_squared == pytest.approx(1.0, abs=1e-10)
    assert fit.n_points == 6 and fit.name == "EE" and not fit.log_abs
    # Zero residuals: the standard errors vanish (up to rounding), they are not NaN.
    assert 0 <= fit.se_b < 1e-8 and 0 <= fit.se_a < 1e-7 and fit.se_alpha == fit.se_b
    x_new = np.array([3e3, 5e7, 1e10])
    np.testing.assert_allclose(fit.predict(x_new), law(x_new), rtol=1e-10)
    np.testing.assert_allclose(fit.log_residuals, 0.0, atol=1e-10)
    assert fit.params == {"a": fit.a, "b": fit.b, "alpha": fit.alpha}


def test_power_law_accepts_lists_and_copies_its_inputs():
    x, y = X6.copy(), law(X6)
    fit = fit_power_law(list(x), list(y))
    assert fit.alpha == pytest.approx(ALPHA, abs=1e-10)
    fit2 = fit_power_law(x, y)
    x[0] = 123.0  # the fit keeps its own copy
    assert fit2.x[0] == X6[0]
    with pytest.raises(ValueError):
        fit2.x[0] = 1.0  # and it is read-only


def test_log_abs_fits_the_magnitude_of_a_negative_term():
    y = -law(X6)  # e.g. Conf, negative at every size
    with pytest.raises(ValueError, match=r"y must be > 0.*log_abs=True"):
        fit_power_law(X6, y)
    fit = fit_power_law(X6, y, name="Conf", log_abs=True)
    assert fit.log_abs and fit.sign == -1
    assert fit.alpha == pytest.approx(ALPHA, abs=1e-10)
    assert fit.a == pytest.approx(math.log(COEF), abs=1e-10)
    assert fit.r_squared == pytest.approx(1.0, abs=1e-10)
    np.testing.assert_allclose(fit.predict([2e7, 1e9]), -law(np.array([2e7, 1e9])), rtol=1e-10)
    assert "log|M|" in repr(fit) and "|M| ~" in repr(fit)
    # Positive data with log_abs is the plain fit.
    pos = fit_power_law(X6, law(X6), log_abs=True)
    assert pos.sign == 1 and pos.alpha == pytest.approx(ALPHA, abs=1e-10)


def test_log_abs_warns_when_y_changes_sign():
    y = law(X6) * np.array([1, 1, 1, -1, -1, -1])
    with pytest.warns(RankopsFitWarning, match="changes sign"):
        fit = fit_power_law(X6, y, log_abs=True)
    assert fit.sign == 0
    assert (fit.predict(X6) > 0).all()  # |M| when there is no one sign to give it


def test_scaling_difference_of_two_known_laws():
    fit_m = fit_power_law(X6, law(X6, 3.0, 0.31))
    fit_ce = fit_power_law(X6, law(X6, 12.0, 0.12))
    assert scaling_difference(fit_m, fit_ce) == pytest.approx(abs(0.31 - 0.12), abs=1e-10)
    assert scaling_difference(fit_ce, fit_m) == pytest.approx(0.19, abs=1e-10)
    # The same models listed in another order are the same x.
    perm = np.array([3, 0, 5, 1, 4, 2])
    fit_p = fit_power_law(X6[perm], law(X6[perm], 12.0, 0.12))
    assert scaling_difference(fit_m, fit_p) == pytest.approx(0.19, abs=1e-10)


def test_scaling_difference_needs_the_same_x():
    fit_m = fit_power_law(X6, law(X6))
    with pytest.raises(ValueError, match="same x"):
        scaling_difference(fit_m, fit_power_law(X6 * 2, law(X6 * 2)))
    with pytest.raises(ValueError, match="same x"):
        scaling_difference(fit_m, fit_power_law(X6[:5], law(X6[:5])))
    sat = fit_saturating(X8, E_TRUE + A_TRUE * X8 ** -ALPHA_SAT, n_starts=4)
    with pytest.raises(TypeError, match="fit_ce"):
        scaling_difference(fit_m, sat)


# --- the paper's fit: standard errors against independent computations -----------------------

def test_standard_errors_match_polyfit_and_linregress():
    x = np.geomspace(1e6, 1e10, 9)
    y = noisy(x, sigma=0.05, seed=3)
    fit = fit_power_law(x, y)
    lx, ly = np.log(x), np.log(y)
    n = x.size

    # numpy.polyfit: the unscaled covariance (X^T X)^-1 times sigma^2 = SS_res / (n - 2).
    (b, a), cov_unscaled = np.polyfit(lx, ly, 1, cov="unscaled")
    resid = ly - (a + b * lx)
    cov = cov_unscaled * (resid @ resid) / (n - 2)
    assert fit.b == pytest.approx(b, rel=1e-10)
    assert fit.a == pytest.approx(a, rel=1e-10)
    assert fit.se_b == pytest.approx(math.sqrt(cov[0, 0]), rel=1e-8)
    assert fit.se_a == pytest.approx(math.sqrt(cov[1, 1]), rel=1e-8)

    # scipy.stats.linregress: slope, intercept, r and both standard errors.
    lr = stats.linregress(lx, ly)
    assert fit.se_b == pytest.approx(lr.stderr, rel=1e-8)
    assert fit.se_a == pytest.approx(lr.intercept_stderr, rel=1e-8)
    assert fit.r_squared == pytest.approx(lr.rvalue ** 2, rel=1e-10)
    assert fit.se_alpha == fit.se_b


# --- bootstrap ---------------------------------------------------------------------------------

X12 = np.geomspace(1e6, 1e10, 12)


def test_bootstrap_interval_covers_the_true_alpha():
    y = noisy(X12, sigma=0.05, seed=7)
    res = bootstrap(X12, y, fit_power_law, n_resamples=1000, seed=0)
    assert isinstance(res, BootstrapResult)
    lo, hi = res.interval("alpha")
    assert lo < ALPHA < hi
    est = fit_power_law(X12, y)
    assert lo < est.alpha < hi
    assert res.estimate["alpha"] == est.alpha
    # Every parameter has an interval; a and b are consistent with alpha = -b.
    assert set(res.intervals) == {"a", "b", "alpha"}
    b_lo, b_hi = res.interval("b")
    assert (b_lo, b_hi) == pytest.approx((-hi, -lo), rel=1e-12)
    assert res.n_used + res.n_degenerate + res.n_failed == res.n_resamples == 1000
    # Percentile interval: 95% of the resampled alphas fall inside it (up to 1/n_used ties).
    s = res.samples["alpha"]
    assert np.mean((s >= lo) & (s <= hi)) == pytest.approx(0.95, abs=0.005)
    # The case bootstrap's standard error is of the order of the OLS one (same data).
    assert 0.5 < res.standard_error("alpha") / est.se_alpha < 2.0


def test_bootstrap_interval_shrinks_with_less_noise():
    # Same normal draws, scaled: the only difference is the noise level.
    wide = bootstrap(X12, noisy(X12, sigma=0.10, seed=11), n_resamples=400, seed=1)
    narrow = bootstrap(X12, noisy(X12, sigma=0.01, seed=11), n_resamples=400, seed=1)
    w_wide = np.subtract(*wide.interval("alpha")[::-1])
    w_narrow = np.subtract(*narrow.interval("alpha")[::-1])
    assert 0 < w_narrow < w_wide / 3
    # A lower confidence gives a narrower interval from the same resamples.
    lo90, hi90 = bootstrap(X12, noisy(X12, 0.10, 11), n_resamples=400, seed=1,
                           confidence=0.90).interval("alpha")
    lo95, hi95 = wide.interval("alpha")
    assert lo95 <= lo90 < hi90 <= hi95


def test_bootstrap_is_deterministic_given_its_seed():
    y = noisy(X12, sigma=0.05, seed=2)
    r1 = bootstrap(X12, y, n_resamples=200, seed=5)
    r2 = bootstrap(X12, y, n_resamples=200, seed=5)
    r3 = bootstrap(X12, y, n_resamples=200, seed=6)
    np.testing.assert_array_equal(r1.samples["alpha"], r2.samples["alpha"])
    assert not np.array_equal(r1.samples["alpha"], r3.samples["alpha"])
    # The method on the fit is the same bootstrap.
    r4 = fit_power_law(X12, y).bootstrap(n_resamples=200, seed=5)
    np.testing.assert_array_equal(r1.samples["alpha"], r4.samples["alpha"])
    assert r4.interval("alpha") == r1.interval("alpha")


def test_bootstrap_skips_and_counts_degenerate_resamples():
    # 3 points: a resample is degenerate (one distinct x) with probability 3 (1/3)^3 = 1/9.
    x = np.array([1e6, 1e7, 1e8])
    y = noisy(x, 0.05, seed=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RankopsFitWarning)  # the full fit's own n=3 warning
        res = bootstrap(x, y, n_resamples=900, seed=0)
    expected = 900 / 9  # binomial(900, 1/9): mean 100, sd 9.4
    assert expected - 40 < res.n_degenerate < expected + 40
    assert res.n_failed == 0
    assert res.n_used == 900 - res.n_degenerate == res.samples["alpha"].size
    assert np.isfinite(res.samples["alpha"]).all()


def test_bootstrap_rejects_bad_options():
    y = law(X12)
    with pytest.raises(ValueError, match="n_resamples"):
        bootstrap(X12, y, n_resamples=0)
    with pytest.raises(ValueError, match="confidence"):
        bootstrap(X12, y, confidence=1.0)
    with pytest.raises(KeyError, match="alpha"):
        bootstrap(X12, y, n_resamples=10).interval("E")


def test_bootstrap_of_the_saturating_fit():
    x = np.geomspace(1e5, 1e9, 10)
    y = (E_TRUE + A_TRUE * x ** -ALPHA_SAT) * np.exp(0.002 * np.random.default_rng(0)
                                                      .standard_normal(x.size))
    fit = fit_saturating(x, y, n_starts=6)
    res = fit.bootstrap(n_resamples=12, seed=0)
    assert set(res.intervals) == {"E", "A", "alpha"}
    for p in ("E", "A", "alpha"):
        lo, hi = res.interval(p)
        assert lo <= hi and np.isfinite([lo, hi]).all()
    assert (res.samples["E"] >= 0).all() and (res.samples["alpha"] > 0).all()
    assert "alpha" in repr(res) and "12 resamples" in repr(res)


# --- saturating form ---------------------------------------------------------------------------

# Noise-free data put the optimum at zero loss on the true parameters. L-BFGS-B stops at a
# projected gradient <= 1e-12 or a loss decrease <= 1e-15, which here leaves parameter errors of
# about 1e-11 relative. 1e-7 keeps four orders of margin for other scipy/BLAS builds and is still
# far below what a loosely stopped fit gives (scipy's default tolerances miss alpha by ~3e-5,
# because their loss-decrease test is absolute for a loss below 1).
SAT_RTOL = 1e-7


def test_saturating_recovers_an_exact_law():
    y = E_TRUE + A_TRUE * X8 ** -ALPHA_SAT
    fit = fit_saturating(X8, y, name="CE")
    assert isinstance(fit, SaturatingFit)
    assert fit.E == pytest.approx(E_TRUE, rel=SAT_RTOL)
    assert fit.A == pytest.approx(A_TRUE, rel=SAT_RTOL)
    assert fit.alpha == pytest.approx(ALPHA_SAT, rel=SAT_RTOL)
    assert fit.converged and fit.loss < 1e-15 and fit.n_points == 8
    x_new = np.array([1e4, 1e11])
    np.testing.assert_allclose(fit.predict(x_new), E_TRUE + A_TRUE * x_new ** -ALPHA_SAT,
                               rtol=SAT_RTOL)
    assert fit.r_squared == pytest.approx(1.0, abs=1e-10)
    assert fit.params == {"E": fit.E, "A": fit.A, "alpha": fit.alpha}


def test_saturating_recovers_zero_E():
    y = A_TRUE * X8 ** -ALPHA_SAT  # a pure power law: E = 0, on its bound
    fit = fit_saturating(X8, y)
    assert 0 <= fit.E < 1e-6 * y.min()
    assert fit.alpha == pytest.approx(ALPHA_SAT, rel=1e-6)
    assert fit.A == pytest.approx(A_TRUE, rel=1e-6)


def test_saturating_is_unit_free():
    # Log residuals do not see the units of y: scaling y scales E and A and leaves alpha.
    y = E_TRUE + A_TRUE * X8 ** -ALPHA_SAT
    fit = fit_saturating(X8, 1e6 * y, n_starts=8)
    assert fit.E == pytest.approx(1e6 * E_TRUE, rel=SAT_RTOL)
    assert fit.A == pytest.approx(1e6 * A_TRUE, rel=SAT_RTOL)
    assert fit.alpha == pytest.approx(ALPHA_SAT, rel=SAT_RTOL)


@pytest.mark.parametrize("case", ["flat", "low outlier", "noisy"])
def test_saturating_respects_its_bounds(case):
    rng = np.random.default_rng(9)
    x = np.geomspace(1e6, 1e10, 7)
    if case == "flat":
        # Nearly constant y pulls E towards min(y): it must stay strictly below.
        y = 2.0 + 1e-4 * rng.standard_normal(x.size)
    elif case == "low outlier":
        # Six points at 2.0 and one at 1.9: the robust loss would put E near 2.0, above min(y);
        # the bound holds it just under 1.9.
        y = np.full(x.size, 2.0)
        y[3] = 1.9
        fit = fit_saturating(x, y, n_starts=8)
        assert y.min() * (1 - 1e-6) < fit.E < y.min()
    else:
        y = (E_TRUE + A_TRUE * x ** -ALPHA_SAT) * np.exp(0.05 * rng.standard_normal(x.size))
    fit = fit_saturating(x, y, n_starts=8)
    assert 0 <= fit.E < y.min()
    assert fit.A > 0 and fit.alpha > 0
    assert np.isfinite(fit.loss) and (fit.predict(x) > 0).all()


def test_saturating_options_are_checked():
    y = E_TRUE + A_TRUE * X8 ** -ALPHA_SAT
    with pytest.raises(ValueError, match="n_starts"):
        fit_saturating(X8, y, n_starts=0)
    with pytest.raises(ValueError, match="huber_delta"):
        fit_saturating(X8, y, huber_delta=0.0)


# --- leave-largest-out -------------------------------------------------------------------------

def test_leave_largest_out_of_an_exact_power_law():
    res = leave_largest_out(X6, law(X6))
    assert isinstance(res, LeaveLargestOut)
    assert res.x_held_out == X6[-1] and res.n_held_out == 1 and res.fit.n_points == 5
    assert res.actual == law(X6)[-1]
    assert abs(res.relative_error) < 1e-10 and abs(res.log_error) < 1e-10


def test_leave_largest_out_of_a_saturating_law_with_a_power_law():
    y = E_TRUE + A_TRUE * X8 ** -ALPHA_SAT
    # Shuffled: the largest x is found, not assumed last.
    perm = np.array([4, 7, 0, 2, 6, 1, 5, 3])
    res = leave_largest_out(X8[perm], y[perm], fit_power_law)
    # Independently: fit the first 7 sizes, predict the 8th.
    lr = stats.linregress(np.log(X8[:-1]), np.log(y[:-1]))
    pred = math.exp(lr.intercept + lr.slope * math.log(X8[-1]))
    assert res.predicted == pytest.approx(pred, rel=1e-10)
    assert res.relative_error == pytest.approx((pred - y[-1]) / y[-1], rel=1e-8)
    assert res.log_error == pytest.approx(math.log(pred / y[-1]), rel=1e-8)
    # log(E + A x^-alpha) is convex in log x (its slope rises towards 0), so the straight
    # line through the smaller models is too steep at the end: it underpredicts, clearly.
    assert res.relative_error < -1e-3 and res.log_error < -1e-3
    # The saturating form extrapolates its own law (5 + 1 points: no few-points warning).
    with warnings.catch_warnings():
        warnings.simplefilter("error", RankopsFitWarning)
        own = leave_largest_out(X8[2:], y[2:], fit_saturating)
    assert abs(own.relative_error) < 1e-6


def test_leave_largest_out_method_and_ties_at_the_largest_x():
    fit = fit_power_law(X6, law(X6))
    assert abs(fit.leave_largest_out().relative_error) < 1e-10
    # Two runs at the largest size are held out together; actual is their mean.
    x = np.append(X6, X6[-1])
    y = np.append(law(X6), law(X6)[-1] * 1.1)
    res = leave_largest_out(x, y)
    assert res.n_held_out == 2 and res.fit.n_points == 5
    assert res.actual == pytest.approx(law(X6)[-1] * 1.05, rel=1e-12)


def test_leave_largest_out_needs_three_points():
    with pytest.raises(ValueError, match="at least 3 points"):
        leave_largest_out(X6[:2], law(X6[:2]))
    with pytest.raises(ValueError, match="same length"):
        leave_largest_out(X6, law(X6)[:-1])


# --- bad inputs and few-points warnings --------------------------------------------------------

BAD_INPUTS = [
    ("one point", [1e6], [1.0], r"at least 2 points"),
    ("no points", [], [], r"at least 2 points"),
    ("mismatched lengths", [1e6, 1e7, 1e8], [1.0, 0.9], r"x and y must have the same length"),
    ("x zero", [0.0, 1e7, 1e8], [1.0, 0.9, 0.8], r"^x must be > 0"),
    ("x negative", [1e6, -1e7, 1e8], [1.0, 0.9, 0.8], r"^x must be > 0"),
    ("y zero", [1e6, 1e7, 1e8], [1.0, 0.0, 0.8], r"^y must be > 0"),
    ("y negative", [1e6, 1e7, 1e8], [1.0, 0.9, -0.8], r"^y must be > 0"),
    ("x nan", [1e6, np.nan, 1e8], [1.0, 0.9, 0.8], r"^x must be finite"),
    ("y nan", [1e6, 1e7, 1e8], [np.nan, 0.9, 0.8], r"^y must be finite"),
    ("y inf", [1e6, 1e7, 1e8], [1.0, np.inf, 0.8], r"^y must be finite"),
    ("x 2-D", [[1e6, 1e7], [1e8, 1e9]], [1.0, 0.9], r"^x must be 1-D"),
    ("one distinct x", [1e7, 1e7, 1e7], [1.0, 0.9, 0.8], r"^x must hold at least 2 distinct"),
]


@pytest.mark.parametrize("fitter", [fit_power_law, fit_saturating])
@pytest.mark.parametrize("case, x, y, match", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_inputs_raise_naming_the_argument(fitter, case, x, y, match):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RankopsFitWarning)
        with pytest.raises(ValueError, match=match):
            fitter(x, y)


def test_log_abs_still_rejects_zero():
    with pytest.raises(ValueError, match=r"y must be nonzero even with log_abs=True"):
        fit_power_law([1e6, 1e7, 1e8, 1e9], [-1.0, 0.0, -0.8, -0.7], log_abs=True)


def test_power_law_warns_with_too_few_points():
    assert issubclass(RankopsFitWarning, UserWarning)
    with pytest.warns(RankopsFitWarning, match="too few points"):
        fit2 = fit_power_law(X6[:2], law(X6[:2]))
    # Two points: an exact line, and no residual degree of freedom to estimate errors from.
    assert fit2.alpha == pytest.approx(ALPHA, abs=1e-10)
    assert math.isnan(fit2.se_a) and math.isnan(fit2.se_b) and math.isnan(fit2.se_alpha)
    assert "± nan" in repr(fit2)
    with pytest.warns(RankopsFitWarning, match="too few points"):
        fit3 = fit_power_law(X6[:3], noisy(X6[:3], 0.05, seed=0))
    assert np.isfinite([fit3.se_a, fit3.se_b]).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RankopsFitWarning)
        fit_power_law(X6[:4], law(X6[:4]))  # 2 residual degrees of freedom: no warning


def test_saturating_warns_with_too_few_points():
    y = E_TRUE + A_TRUE * X8 ** -ALPHA_SAT
    with pytest.warns(RankopsFitWarning, match="too few points"):
        fit_saturating(X8[:4], y[:4], n_starts=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RankopsFitWarning)
        fit_saturating(X8[:5], y[:5], n_starts=4)


# --- reprs and docstrings ----------------------------------------------------------------------

def test_reprs_are_readable():
    fit = fit_power_law(X12, noisy(X12, 0.05, seed=7), name="EE")
    r = repr(fit)
    assert r.startswith("PowerLawFit(EE: M ~ ") and "* X^-0.3" in r
    assert f"alpha={fit.alpha:.3f} ± {fit.se_alpha:.3f}" in r
    assert f"R^2={fit.r_squared:.3f}" in r and r.endswith("n=12)")
    assert repr(fit_power_law(X6, law(X6))).startswith("PowerLawFit(M ~ 7.5e+00 * X^-0.310")

    sat = fit_saturating(X8, E_TRUE + A_TRUE * X8 ** -ALPHA_SAT, name="CE", n_starts=8)
    assert repr(sat).startswith("SaturatingFit(CE: M ~ 1.7 + 4.000e+01 * X^-0.350")

    boot = fit.bootstrap(n_resamples=50, seed=0)
    lo, hi = boot.interval("alpha")
    assert "95% percentile intervals" in repr(boot)
    assert f"[{lo:.4g}, {hi:.4g}]" in repr(boot)

    lo_res = fit.leave_largest_out()
    assert repr(lo_res).startswith("LeaveLargestOut(X=1e+10: predicted ")
    assert "relative error" in repr(lo_res)


def test_docstring_examples_run():
    result = doctest.testmod(rankops.fit, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 10 and result.failed == 0
