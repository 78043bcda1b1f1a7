"""The one statistic a round of runs is summed up by, on a calibrating device (device_agent.suite_runner) and in the
host's comparisons (pipeline.profile.compare): a low percentile, since interference only ever adds time."""

from __future__ import annotations

import numpy as np

from device_agent import suite_runner
from pipeline.profile import compare


def test_a_round_is_its_quick_runs_not_what_interference_added():
    quiet = np.full(20, 1.0)
    slowed = np.concatenate([np.full(6, 1.0), np.full(14, 2.5)])  # another process took a core for most of it
    assert suite_runner.round_figure_ms(quiet) == 1.0
    assert suite_runner.round_figure_ms(slowed) == 1.0 < float(np.median(slowed))
    assert suite_runner.round_figure_ms([3.0, 1.0, 2.0]) == np.percentile([1.0, 2.0, 3.0], 10)


def test_calibration_and_validation_take_the_same_statistic():
    assert compare.round_figure_ms is suite_runner.round_figure_ms
