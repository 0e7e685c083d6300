"""bench/soak.py's memory verdict: the RSS trend it reports tells a leak (steady growth) from allocator warm-up."""
import pytest

from bench.soak import SoakArgs, rss_trend


def _samples(mib_at):
    """(seconds in, requests finished, MiB) every 5 s over 100 s at 10 requests a second."""
    return [(t, 10 * t, mib_at(t)) for t in range(0, 101, 5)]


def test_a_leak_grows_in_both_halves():
    trend = rss_trend(_samples(lambda t: 800 + 0.5 * t))  # 0.5 MiB a second = 50 MiB per 1,000 requests
    assert abs(trend["first_half"] - 50) < 1e-9 and abs(trend["second_half"] - 50) < 1e-9
    assert trend["quarters"] == [800, 812.5, 825, 837.5, 850] and trend["peak"] == 850


def test_allocator_warm_up_levels_off_in_the_second_half():
    trend = rss_trend(_samples(lambda t: 800 + min(t, 20) * 5 + (30 if t == 60 else 0)))
    assert trend["first_half"] == 100 * 1000 / 500 and trend["second_half"] == 0
    assert trend["quarters"] == [800, 900, 900, 900, 900] and trend["peak"] == 930


def test_too_few_samples_give_no_trend_and_bad_intervals_are_refused():
    assert rss_trend(_samples(lambda t: 800)[:2]) is None
    for bad in (0, -1):
        with pytest.raises(ValueError, match="sample_s"):
            SoakArgs(sample_s=bad)
