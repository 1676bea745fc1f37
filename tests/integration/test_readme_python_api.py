"""The README's Python API example, verbatim, saved as a plain script and run with `python example.py`."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from helpers import ROOT
from PIL import Image

pytestmark = pytest.mark.slow


def readme_python_api_example() -> str:
    section = (ROOT / "README.md").read_text().split("## Python API", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)


def test_readme_python_api_example_runs_as_a_plain_script(tmp_path):
    code = readme_python_api_example()
    # The point: a script with no `if __name__ == "__main__":` guard starts mp workers.
    assert "__main__" not in code and "num_gpus=2" in code
    (tmp_path / "example.py").write_text(code)
    result = subprocess.run(
        [sys.executable, "example.py"], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "[0, 1]"
    with Image.open(tmp_path / "circle.png") as image:
        assert image.size == (64, 64)
    assert "bootstrapping phase" not in result.stderr
