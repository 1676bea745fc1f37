"""`imagegen serve` as a user runs it: help, start-up failures."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest
from helpers import run_cli

from engine import OmniDiffusionConfig


def test_serve_help_lists_every_setting_with_its_default():
    result = run_cli("serve", "--help")
    assert result.returncode == 0
    for name in OmniDiffusionConfig.model_fields:
        assert f"--{name.replace('_', '-')}" in result.stdout
    assert "--backend" in result.stdout
    assert "(default: 127.0.0.1)" in result.stdout
    assert "(default: 8000)" in result.stdout


def processes_with_marker(marker: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker.encode() in (entry / "environ").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


@pytest.mark.slow
def test_missing_model_exits_nonzero_with_one_line_and_no_orphans(tmp_path):
    marker = f"IMAGEGEN_TEST_MARKER={uuid.uuid4().hex}"
    started = time.monotonic()
    missing = tmp_path / "missing-model"
    result = run_cli("serve", "--model", str(missing), "--port", "0", env=dict([marker.split("=")]))
    assert time.monotonic() - started < 30
    assert result.returncode != 0
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("imagegen:")]
    assert len(error_lines) == 1 and str(missing) in error_lines[0]
    assert "Traceback" not in result.stderr
    assert processes_with_marker(marker) == []


def test_invalid_setting_exits_with_usage_error():
    result = run_cli("serve", "--device", "tpu")
    assert result.returncode == 2
    assert "--device" in result.stderr
