"""The suggestion rules of finder/rules.py on hand-made curves (nan and inf included), without a trainer; the
sweep's length and auto's repeats (finder/choose.py), decided from the numbers alone."""

import math

import numpy as np
import pytest

from mlproject.config import JobConfig
from mlproject.finder import choose, rules
from mlproject.finder.result import RangeTest
from mlproject.finder.rules import suggest
from mlproject.finder.sweep import LRCurve

LRS = np.logspace(-6, 0, 100)
X = np.log10(LRS)


def sigmoid_curve(center: float = -3.0, width: float = 0.25, blowup_at: float = -1.0) -> np.ndarray:
    """Loss 2.3 falling to 0.5 around 10**center (steepest exactly there), exploding past 10**blowup_at."""
    fall = 2.3 - 1.8 / (1 + np.exp(-(X - center) / width))
    return fall + np.where(blowup_at < X, np.expm1(8 * (X - blowup_at)), 0.0)


def decades(a: float, b: float) -> float:
    return abs(math.log10(a) - math.log10(b))


def test_steepest_finds_the_steepest_point_of_a_clean_curve():
    found = rules.steepest(rules.usable_curve(LRS, sigmoid_curve(center=-3.0)))
    assert decades(found.lr, 1e-3) < 0.1


@pytest.mark.parametrize("center", [-4.0, -3.0, -2.5])
def test_steepest_tracks_the_descent_when_it_moves(center):
    found = rules.steepest(rules.usable_curve(LRS, sigmoid_curve(center=center, blowup_at=center + 1.5)))
    assert decades(found.lr, 10**center) < 0.15


def test_steepest_survives_noise():
    rng = np.random.default_rng(0)
    noisy = sigmoid_curve() * np.exp(rng.normal(0, 0.08, len(LRS)))
    found = suggest(LRS, noisy, "steepest")
    assert decades(found.lr, 1e-3) < 0.3


def test_minimum_rule_is_a_tenth_of_the_lr_at_the_minimum():
    curve = rules.usable_curve(LRS, sigmoid_curve(blowup_at=-1.0))
    i_min = int(np.argmin(curve.smoothed))
    assert rules.minimum(curve).lr == pytest.approx(LRS[i_min] / 10)
    assert decades(LRS[i_min], 1e-1) < 0.3


def test_valley_lies_inside_the_descent():
    found = rules.valley(rules.usable_curve(LRS, sigmoid_curve(center=-3.0)))
    assert 10**-3.8 < found.lr < 10**-1.5


def test_combined_is_the_geometric_mean_of_steepest_and_the_ceiling_and_reports_every_rule():
    losses = sigmoid_curve()
    found = suggest(LRS, losses)
    assert found.method == "combined"
    assert set(found.candidates) == {"steepest", "valley", "minimum"}
    ceiling = rules.bottom(rules.usable_curve(LRS, losses)) / rules.SAFETY
    assert found.lr == pytest.approx(math.sqrt(found.candidates["steepest"] * ceiling))
    assert 0 < found.confidence <= 1


def test_the_floor_is_the_middle_of_a_flat_bottom_not_its_noisiest_point():
    # Flat between 10**-2.5 and 10**-1.5, a noise dip of 3% of the drop at its left edge.
    losses = np.interp(X, [-6, -4, -2.5, -1.5, 0], [2.3, 2.3, 0.5, 0.5, 3.0])
    losses[(X > -2.5) & (X < -2.3)] -= 0.08
    curve = rules.usable_curve(LRS, losses)
    assert decades(rules.bottom(curve), 10**-2.0) < 0.15
    assert decades(float(curve.lrs[np.argmin(curve.smoothed)]), 10**-2.0) > 0.2  # where the argmin went


@pytest.mark.parametrize(("steps", "weight"), [(None, 0.5), (5000, 0.5), (600, 0.5), (100, 1.0), (20, 1.0)])
def test_weight_toward_the_floor_grows_as_the_training_shortens(steps, weight):
    assert rules.toward_floor(steps) == pytest.approx(weight)


def test_a_shorter_training_gets_a_larger_suggestion_up_to_the_ceiling():
    losses = sigmoid_curve()
    ceiling = rules.bottom(rules.usable_curve(LRS, losses)) / rules.SAFETY
    lrs = [suggest(LRS, losses, train_steps=n).lr for n in (5000, 400, 200, 100)]
    assert lrs == sorted(lrs) and lrs[0] < lrs[1] < lrs[2]
    assert lrs[-1] == pytest.approx(ceiling)


def test_combined_never_comes_within_the_safety_factor_of_the_minimum():
    # A curve that falls late and steeply right before blowing up: every rule points near the minimum.
    losses = sigmoid_curve(center=-1.3, width=0.1, blowup_at=-1.0)
    curve = rules.usable_curve(LRS, losses)
    lr_at_min = LRS[int(np.argmin(curve.smoothed))]
    for steps in (None, 50):
        found = suggest(LRS, losses, train_steps=steps)
        assert found.lr <= lr_at_min / rules.SAFETY * (1 + 1e-9)


def test_nan_from_the_first_step_falls_back_with_a_reason():
    found = suggest(LRS, [float("nan")] * len(LRS), fallback_lr=3e-4)
    assert (found.lr, found.method) == (3e-4, "fallback")
    assert "0 usable points" in found.reason
    assert found.confidence == 0


def test_inf_midway_cuts_the_curve_and_the_suggestion_stays_below_it():
    losses = sigmoid_curve()
    losses[70:] = np.inf
    found = suggest(LRS, losses)
    assert found.method == "combined"
    assert found.lr < LRS[70]


def test_flat_curve_falls_back():
    found = suggest(LRS, np.full(len(LRS), 2.30), fallback_lr=1e-3)
    assert found.method == "fallback"
    assert "flat" in found.reason
    assert found.candidates == {"steepest": None, "valley": None, "minimum": None}  # no rule found an LR


@pytest.mark.parametrize("method", ["combined", "steepest", "valley", "minimum"])
def test_every_method_answers_with_an_lr_even_for_a_curve_it_cannot_read(method):
    found = suggest(LRS[:5], [2.3, 2.2, 2.1, 2.0, 1.9], method, fallback_lr=5e-4)
    assert (found.lr, found.method, found.confidence) == (5e-4, "fallback", 0.0)
    assert found.reason == f"only 5 usable points, need {rules.MIN_POINTS}"


def test_rising_curve_falls_back():
    found = suggest(LRS, np.linspace(2.3, 9.0, len(LRS)))
    assert found.method == "fallback"


def test_too_few_points_fall_back_saying_how_many():
    found = suggest(LRS[:6], sigmoid_curve()[:6])
    assert found.method == "fallback"
    assert "only 6 usable points" in found.reason


def test_early_divergence_leaves_too_few_points():
    losses = np.full(len(LRS), np.nan)
    losses[:4] = [2.3, 2.2, 50.0, 1e6]
    found = suggest(LRS, losses)
    assert found.method == "fallback"
    assert "usable points" in found.reason


def test_divergence_without_nan_cuts_the_curve_at_four_times_the_minimum():
    curve = rules.usable_curve(LRS, sigmoid_curve(blowup_at=-1.0))
    assert curve.reason.startswith("loss above 4x")
    assert len(curve.lrs) == curve.stopped_at < len(LRS)
    assert LRS[curve.stopped_at] > 10**-1.2  # at the blow-up (from 0.1), which smoothing sees a step early


def test_suggestion_range_brackets_the_suggestion():
    found = suggest(LRS, sigmoid_curve())
    assert found.lr_low < found.lr <= found.lr_high <= rules.PEAK_CAP * found.lr
    assert found.lr_high == pytest.approx(10 * found.lr_low)
    floor = rules.bottom(rules.usable_curve(LRS, sigmoid_curve()))
    assert found.lr_high <= floor / rules.PEAK_SAFETY  # the peak keeps its distance from divergence


def test_mismatched_lengths_and_unknown_method_are_errors():
    with pytest.raises(ValueError, match="differ in length"):
        suggest(LRS, sigmoid_curve()[:-1])
    with pytest.raises(ValueError, match="unknown method"):
        suggest(LRS, sigmoid_curve(), method="magic")


def test_smoothing_has_no_phase_lag():
    y = sigmoid_curve(blowup_at=10)  # no blow-up: a pure falling step
    sm = rules.smooth(y)
    # Zero phase: the smoothed curve crosses the midpoint where the raw one does.
    mid = (y.max() + y.min()) / 2
    assert abs(int(np.argmin(abs(sm - mid))) - int(np.argmin(abs(y - mid)))) <= 1


def u_curve(rise_at: float = -1.5) -> np.ndarray:
    """Falls around 1e-3 like sigmoid_curve, then climbs back to 3.0 (above its start) from 10**rise_at."""
    return sigmoid_curve(blowup_at=10) + np.where(rise_at < X, 2.5 * (X - rise_at), 0.0)


def test_a_sweep_stops_a_smoothing_window_after_the_loss_climbs_back_above_its_start():
    losses = u_curve()
    k = rules.stop_step(LRS, losses)
    crossing = int(np.argmax((X > -1.5) & (losses > 2.3)))  # the raw curve's crossing of its start level
    window = int(3 * rules.SMOOTH_DECADES * rules.points_per_decade(LRS))
    assert k is not None and crossing + window - 3 <= k <= crossing + window + 3 < len(LRS)
    # What the stopped sweep suggests is what the full sweep suggests.
    for method in rules.METHODS:
        assert suggest(LRS[:k], losses[:k], method).lr == pytest.approx(suggest(LRS, losses, method).lr)


def test_a_sweep_that_never_climbs_back_runs_to_the_end():
    assert rules.stop_step(LRS, sigmoid_curve(blowup_at=10)) is None  # falls and stays down
    assert rules.stop_step(LRS, np.full(len(LRS), 2.3)) is None  # flat: nothing to stop on


def test_a_sweep_stops_at_a_non_finite_loss_and_after_the_four_times_cut():
    losses = sigmoid_curve(blowup_at=10)
    losses[60] = np.inf
    assert rules.stop_step(LRS, losses) == 61
    blowup = sigmoid_curve(blowup_at=-1.0)
    k = rules.stop_step(LRS, blowup)
    assert k is not None and k > rules.usable_curve(LRS, blowup).stopped_at
    assert suggest(LRS[:k], blowup[:k]).lr == pytest.approx(suggest(LRS, blowup).lr)


def test_smoothing_and_start_level_are_set_in_decades_so_a_shorter_sweep_reads_the_same():
    losses = u_curve()
    full, cut = rules.usable_curve(LRS, losses), rules.usable_curve(LRS[:80], losses[:80])
    np.testing.assert_allclose(cut.smoothed[:60], full.smoothed[:60])
    assert rules._start_level(cut) == rules._start_level(full)


@pytest.mark.parametrize("noise", [0.05, 0.10])
def test_noise_on_the_flat_start_does_not_stop_a_sweep_before_its_descent(noise):
    rng = np.random.default_rng(1)
    stopped = 0
    for _ in range(40):
        losses = u_curve() * np.exp(rng.normal(0, noise, len(LRS)))
        k = rules.stop_step(LRS, losses)
        assert k is None or LRS[k - 1] > 10**-1.5  # never before the climb that starts at 10**-1.5
        if k is not None:
            assert suggest(LRS[:k], losses[:k]).lr == pytest.approx(suggest(LRS, losses).lr)
            stopped += 1
    assert stopped > 20  # and the climb itself still stops most of them


def test_a_spike_above_the_start_before_the_descent_does_not_stop_the_sweep():
    losses = u_curve()
    losses[(X > -5.0) & (X < -4.7)] += 0.6  # a burst of bad batches on the plateau, then the real descent
    k = rules.stop_step(LRS, losses)
    assert k is not None and LRS[k - 1] > 10**-1.5


def test_a_long_sweep_stops_after_its_climb_and_its_fft_smoothing_matches_direct_convolution():
    lrs = np.logspace(-6, 0, 6000)
    x = np.log10(lrs)
    losses = 2.3 - 1.8 / (1 + np.exp(-(x + 3) / 0.25)) + np.where(x > -1.5, 2.5 * (x + 1.5), 0.0)
    k = rules.stop_step(lrs, losses)
    curve = rules.usable_curve(lrs, losses)
    assert k is not None and lrs[k - 1] > 10**-1.5
    assert curve.sigma > rules.FFT_RADIUS  # this curve went through the FFT path
    kernel = np.exp(-0.5 * (np.arange(-int(3 * curve.sigma), int(3 * curve.sigma) + 1) / curve.sigma) ** 2)
    np.testing.assert_allclose(rules._convolve(losses, kernel), np.convolve(losses, kernel), rtol=1e-9)


def momentum_curve(dip: float = 1.9) -> np.ndarray:
    """Shaped like LeNet under SGD with momentum 0.9 (benchmarks/RESULTS.md): flat at 2.30 until 10**-2, a shallow
    fall (8%) cut short by a spike above the start at 10**-0.9, then the dead network's plateau at 2.30 with a
    dip to `dip` at 10**-0.5 (a network that recovered for a while)."""
    fall = 2.3 - 0.2 * np.clip((X + 2.0) / 1.0, 0.0, 1.0)
    spike = 1.6 * np.exp(-0.5 * ((X + 0.9) / 0.06) ** 2)
    after = np.where(X > -0.85, 0.2 * np.clip((X + 0.85) / 0.1, 0.0, 1.0), 0.0)  # back to 2.30 after the spike
    recovery = (2.3 - dip) * np.exp(-0.5 * ((X + 0.5) / 0.1) ** 2)
    return fall + spike + after - recovery


def test_a_curve_is_cut_where_it_climbs_back_above_its_start_so_a_later_dip_is_no_floor():
    losses = momentum_curve(dip=1.9)  # the dip after the spike lies below the shallow descent's minimum
    curve = rules.usable_curve(LRS, losses)
    assert curve.reason == "loss back above its start"
    assert curve.lrs[-1] < 10**-0.9  # before the spike's top, long before the dip
    found = suggest(LRS, losses)
    assert found.lr <= 10**-1.0 / rules.SAFETY  # from the floor before the spike, not the dip at 10**-0.5
    assert found.lr == pytest.approx(suggest(LRS, momentum_curve(dip=2.3)).lr, rel=0.1)  # as if there were no dip


def test_a_shallow_descent_lowers_the_confidence_and_says_so():
    shallow, deep = suggest(LRS, momentum_curve()), suggest(LRS, sigmoid_curve())
    drop = rules.depth(rules.usable_curve(LRS, momentum_curve()))
    assert drop < rules.DEEP_DROP and shallow.confidence == pytest.approx(drop / rules.DEEP_DROP)
    assert f"a shallow descent ({drop:.0%} below the start)" in shallow.reason
    assert deep.confidence == 1.0 and "shallow" not in deep.reason


def test_a_momentum_curve_stops_a_window_after_its_spike_and_suggests_what_the_full_sweep_would():
    losses = momentum_curve()
    k = rules.stop_step(LRS, losses)
    cut = rules.usable_curve(LRS, losses).stopped_at
    assert k is not None and k == cut + int(3 * rules.usable_curve(LRS, losses).sigma) + 1
    assert suggest(LRS[:k], losses[:k]).lr == pytest.approx(suggest(LRS, losses).lr)


def batchnorm_curve() -> np.ndarray:
    """Shaped like the BatchNorm CNN under SGD with momentum: an early, deep fall (2.5 to 0.65 from 10**-4.5 to
    10**-2.5), a broad floor to 10**-1.7, a spike far above the start at 10**-1, then a recovery (BatchNorm's scale
    invariance) that dips below the floor at 10**-0.3."""
    fall = 2.5 - 1.85 / (1 + np.exp(-(X + 3.5) / 0.3))
    spike = 4.0 * np.exp(-0.5 * ((X + 1.0) / 0.15) ** 2)
    recovery = np.where(X > -1.0, -0.2 * np.exp(-0.5 * ((X + 0.3) / 0.15) ** 2), 0.0)
    return fall + spike + recovery


def test_a_batchnorm_curve_is_read_up_to_its_spike_with_full_confidence():
    losses = batchnorm_curve()
    curve = rules.usable_curve(LRS, losses)
    assert curve.lrs[-1] < 10**-1.0  # the recovery beyond the spike is not read
    floor = rules.bottom(curve)
    assert 10**-3.3 < floor < 10**-1.5  # inside the broad floor
    found = suggest(LRS, losses)
    assert found.confidence == 1.0
    assert found.lr <= floor / rules.SAFETY * (1 + 1e-9)


# --- the cliff: how far from divergence the job trains ---------------------------------------------------------


def cliff_curve(fall_at: float = -1.2, cliff_at: float = -1.0) -> np.ndarray:
    """A late, steep fall whose floor runs right up to a divergence at 10**cliff_at: where a one-cycle peak read off
    the floor alone sits within a hair of the cliff (the shape of SGD with momentum)."""
    fall = 2.3 - 1.0 / (1 + np.exp(-(X - fall_at) / 0.08))
    return fall + np.where(cliff_at < X, np.expm1(12 * (X - cliff_at)), 0.0)


def test_nothing_the_job_trains_at_sits_within_the_margin_of_the_cliff():
    losses = cliff_curve()
    curve = rules.usable_curve(LRS, losses)
    edge = rules.cliff(curve)
    assert edge is not None and curve.reason.startswith("loss above")
    found = suggest(LRS, losses, train_steps=50)  # a short fit leans all the way to the floor
    assert found.lr <= edge / rules.CLIFF_MARGIN and found.lr_high <= edge / rules.CLIFF_MARGIN * (1 + 1e-9)
    unguarded = rules.lr_range(curve, found.lr)[1]
    assert unguarded > edge / rules.CLIFF_MARGIN, "the margin moved the peak: the floor alone put it nearer"
    assert f"{rules.CLIFF_MARGIN:g}x below lr {edge:.3g}, where the sweep was cut" in found.reason


def test_a_curve_never_cut_has_no_cliff_to_keep_from():
    curve = rules.usable_curve(LRS, sigmoid_curve(blowup_at=1.0))
    assert rules.cliff(curve) is None
    assert "below lr" not in suggest(LRS, sigmoid_curve(blowup_at=1.0)).reason


@pytest.mark.parametrize(("momentum", "per_decade", "factor"), [(0.0, 16.5, 1.0), (0.9, 10.0, 0.1), (0.5, 2.0, 0.1)])
def test_momentum_moves_a_divergence_down_by_the_buffers_time_constant(momentum, per_decade, factor):
    # 1/(1 - momentum) steps of lag, at per_decade steps a decade
    assert rules.momentum_lag(momentum, per_decade) == pytest.approx(factor)


def test_a_heavy_ball_sweep_reads_its_divergence_where_the_lr_set_it_off_not_where_it_showed():
    losses = cliff_curve()
    curve = rules.usable_curve(LRS, losses)
    lag = rules.momentum_lag(0.9, curve.per_decade)
    assert rules.cliff(curve, momentum=0.9) == pytest.approx(rules.cliff(curve) * lag)
    plain, heavy = suggest(LRS, losses, train_steps=50), suggest(LRS, losses, train_steps=50, momentum=0.9)
    assert heavy.lr_high == pytest.approx(rules.cliff(curve) * lag / rules.CLIFF_MARGIN)
    assert heavy.lr_high < plain.lr_high and heavy.lr <= heavy.lr_high


def test_a_climb_back_above_the_start_is_not_moved_by_momentum():
    losses = momentum_curve()
    curve = rules.usable_curve(LRS, losses)
    assert curve.reason == rules.RISE_REASON
    assert rules.cliff(curve, momentum=0.9) == rules.cliff(curve) == pytest.approx(curve.lrs[-1])


# --- how long the sweep runs, and when auto repeats it ------------------------------------------------------------


def test_a_sweep_asked_too_sparse_runs_eight_steps_a_decade_and_says_why():
    steps, why = choose.sweep_steps(20, fit=62, decades=6.0)
    assert steps == choose.MIN_PER_DECADE * 6 == 48
    assert why.startswith("48 steps, not lr_steps=20: 3.3 steps a decade of LR cannot be read")


@pytest.mark.parametrize(("asked", "fit", "steps"), [(100, 3440, 100), (100, 120, 60), (100, 62, 48), (50, 0, 50)])
def test_a_sweep_takes_at_most_half_the_fit_beyond_its_least(asked, fit, steps):
    assert choose.sweep_steps(asked, fit, 6.0)[0] == steps


def range_test_of(suggestion: rules.Suggestion, fit_steps: int, sweep: int = 100) -> RangeTest:
    curve = LRCurve(list(LRS[:sweep]), [2.3] * sweep, [], "", 1e-6, 1.0, sweep, 0.1, 100, 1)
    usable = rules.usable_curve(curve.lrs, curve.losses)
    return RangeTest(curve, usable, usable, suggestion, (suggestion.lr,), 0.0, fit_steps)


def test_auto_repeats_a_doubtful_range_test_where_three_fit_in_its_share_of_the_fit():
    doubtful = rules.Suggestion(1e-2, "combined", 0.4, "a shallow descent (8% below the start)")
    more, why = choose.auto_repeats(JobConfig(), range_test_of(doubtful, fit_steps=3440))
    assert more == choose.AUTO_REPEATS - 1 and why.startswith("the suggestion's confidence is 0.40")
    assert choose.auto_repeats(JobConfig(), range_test_of(doubtful, fit_steps=500))[0] == 0, "3 x 100 > 250 steps"
    assert choose.auto_repeats(JobConfig(lr_verify="off"), range_test_of(doubtful, 3440))[0] == 0
    assert choose.auto_repeats(JobConfig(lr_repeats=2), range_test_of(doubtful, 3440))[0] == 0, "as the user asked"


def test_auto_does_not_repeat_a_confident_range_test():
    confident = rules.Suggestion(1e-2, "combined", 1.0, "")
    assert choose.auto_repeats(JobConfig(), range_test_of(confident, fit_steps=3440)) == (0, "")
