import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from helpers import CHROMEDRIVER, CHROMIUM, ServerProcess, chromium  # noqa: E402


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


@pytest.fixture
def browser():
    """A fresh headless Chromium (its own profile) for one test."""
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not Path(path).exists()]
    if missing:
        message = f"{', '.join(missing)} not installed (apt-get install chromium chromium-driver)"
        if os.environ.get("CI"):
            pytest.fail(f"{message}; .ci/run installs them")
        pytest.skip(message)
    with chromium() as driver:
        yield driver


@pytest.fixture(scope="session")
def screenshots(tmp_path_factory: pytest.TempPathFactory):
    """save(driver, name): a PNG of the page under the session's temp dir (a test artifact to look at)."""
    folder = tmp_path_factory.mktemp("screenshots", numbered=False)

    def save(driver, name: str) -> Path:
        path = folder / f"{name}.png"
        driver.save_screenshot(str(path))
        return path

    return save
