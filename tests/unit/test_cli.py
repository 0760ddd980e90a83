"""The worker's command line: settings that are not engine fields."""

from __future__ import annotations

import pytest

from worker.cli import build_parser


def test_gil_switch_interval_defaults_to_one_millisecond():
    assert build_parser().parse_args(["run", "--config", "x"]).gil_switch_ms == 1.0
    assert build_parser().parse_args(
        ["run", "--config", "x", "--gil-switch-ms", "0.5"]).gil_switch_ms == 0.5


@pytest.mark.parametrize("bad", ["0", "-1", "nan"])
def test_gil_switch_interval_must_be_positive(bad, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "--config", "x", "--gil-switch-ms", bad])
    assert "--gil-switch-ms" in capsys.readouterr().err
