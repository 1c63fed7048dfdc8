"""Figure helpers of the report that hold arithmetic of their own."""

import itertools

from qanalyze.report.figures import NICE_RATIOS, compression_ticks


def test_compression_ticks_are_round_ratios_spread_over_the_axis():
    fp32_mb, xlim = 45.6, (4.0, 48.0)  # the SST-2 sweep's chart: 6 to 46 MB
    ticks = compression_ticks(fp32_mb, xlim)
    assert set(ticks) <= set(NICE_RATIOS) and {1, 2, 4} <= set(ticks)
    positions = [fp32_mb / t for t in ticks]
    assert all(xlim[0] <= p <= xlim[1] for p in positions)
    width = xlim[1] - xlim[0]
    assert min(abs(a - b) for a, b in itertools.combinations(positions, 2)) >= 0.06 * width
    # 10x and 12x sit 0.8 MB apart near the left edge: only one of them is labelled
    assert not {10, 12} <= set(ticks)


def test_compression_ticks_outside_the_axis_are_left_out():
    assert compression_ticks(100.0, (40.0, 60.0)) == [2, 2.5]
    assert compression_ticks(100.0, (200.0, 300.0)) == []
