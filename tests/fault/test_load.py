"""The overload soak (bench/load_test.py) at a size CI can afford."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from helpers import ROOT

pytestmark = pytest.mark.slow


def test_overload_gets_only_200_and_429_and_memory_stays_bounded():
    result = subprocess.run(
        [sys.executable, "bench/load_test.py", "--requests", "300", "--concurrency", "32", "--queue", "8",
         "--time-limit-s", "240"],
        cwd=ROOT, capture_output=True, text=True, timeout=400,
    )
    report = json.loads(result.stdout[result.stdout.index("{"):])
    assert set(report["outcomes"]) <= {"200", "429"}, report
    assert report["outcomes"].get("200", 0) > 0 and report["outcomes"].get("429", 0) > 0, report
    assert sum(report["outcomes"].values()) == 300
    assert report["rss_growth_mb"] < 150, report
    assert result.returncode == 0, result.stderr[-2000:]
