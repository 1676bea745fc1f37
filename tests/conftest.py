import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
# The demo model's scene world (captions, renderings, the pixel scorer) lives beside its training script.
sys.path.insert(0, str(Path(__file__).parents[1] / "scripts"))

from helpers import ServerProcess  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Built-in models are built once per test session, into a private folder. Tests that name
    no model get the fast random-weight ``tiny`` model rather than the default ``demo``."""
    cache = tmp_path_factory.mktemp("models")
    os.environ["IMAGEGEN_MODEL_CACHE_DIR"] = str(cache)
    os.environ.setdefault("IMAGEGEN_MODEL", "tiny")
    return cache


@pytest.fixture(scope="session")
def tiny_server():
    """One real server (tiny model, one mp worker) shared by the tests that only send requests."""
    server = ServerProcess("--model", "tiny", "--max-batch-size", "8", "--batch-timeout-ms", "20")
    yield server
    server.stop()
