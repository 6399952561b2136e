"""``ms1-bench --sweep`` once, on one latency, with the window shortened so it ends in a few
seconds: ms1's default settings reach the ceiling with no 429 and nothing lost."""

from __future__ import annotations

import shutil

import pytest

from ms1.tools import bench


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server")
def test_sweep_one_latency(capsys: pytest.CaptureFixture[str]) -> None:
    assert bench.share_of_ceiling([0.0, 1.0, 2.0, 3.0], 2, 2.0) == 1.0
    assert bench.main(["--sweep", "0.05", "--count", "7500", "--sweep-window", "2",
                       "--timeout", "30"]) == 0
    out = capsys.readouterr().out
    assert bench.SWEEP_HEADER in out
    row = out.strip().splitlines()[-1].split()
    # latency "s" share max of-max in-flight-max "/" mean target-max "/" mean 429s lost ...
    assert row[0] == "0.05" and row[11:13] == ["0", "0"], out  # no 429, none lost
    assert row[13] == "150"
    assert float(row[4].rstrip("%")) >= 90.0, out  # share of the safe maximum
