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


def test_worker_refuses_several_models_in_one_line():
    # The list a ConfigMap may share between the server and its workers.
    result = run_cli("worker", "--port", "0", env={"IMAGEGEN_MODEL": "demo,tiny-flux"})
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "imagegen: a worker serves one model; --model names 2: demo,tiny-flux"
    ]


def test_a_bad_models_file_entry_exits_with_one_line_naming_the_entry_and_key(tmp_path):
    models = tmp_path / "models.yaml"
    models.write_text("- model: tiny\n- model: demo\n  host: 0.0.0.0\n")
    result = run_cli("serve", "--models-file", str(models), "--port", "0")
    assert result.returncode == 2
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("imagegen:")]
    assert f"models file {models}, entry 2 (demo): 'host' is a server-wide setting" in line
    assert "Traceback" not in result.stderr
