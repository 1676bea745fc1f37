import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
# The demo model's scene world (captions, renderings, the pixel scorer) lives beside its training script.
sys.path.insert(0, str(Path(__file__).parents[1] / "scripts"))

from helpers import (  # noqa: E402
    CHROMEDRIVER,
    CHROMIUM,
    TEST_API_KEY,
    ServerProcess,
    chromium,
    ray_test_environment,
    start_workers,
)


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


@pytest.fixture(scope="session")
def keyed_server():
    """A real server with API key TEST_API_KEY, a queue of one image (see helpers.queue_held_full),
    and requests allowed to run until their client hangs up. In request mode: a long request then holds
    the worker, and the next one holds the queue."""
    server = ServerProcess(
        "--model", "tiny", "--api-key", TEST_API_KEY, "--max-queue-size", "1", "--max-num-inference-steps", "100000",
        "--scheduling", "request",
    )
    yield server
    server.stop()


@pytest.fixture(scope="module", params=["mp", "ray", "grpc"])
def streaming_server(request):
    """The tiny model served with each backend that streams progress from its workers."""
    if request.param == "mp":
        yield request.getfixturevalue("tiny_server")
        return
    if request.param == "grpc":
        (worker,) = start_workers(1, "--model", "tiny")
        try:
            server = ServerProcess("--model", "tiny", "--backend", "grpc", "--worker-addresses", worker.address)
            yield server
            server.stop()
        finally:
            worker.stop()
        return
    with ray_test_environment():  # the server starts a private local Ray with these settings
        server = ServerProcess("--model", "tiny", "--backend", "ray")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def tiny_worker():
    """A WorkerWrapperBase with the tiny model loaded, in this process."""
    from engine import OmniDiffusionConfig
    from workers.worker import WorkerWrapperBase

    worker = WorkerWrapperBase(0, OmniDiffusionConfig(model="tiny"))
    worker.initialize()
    yield worker
    worker.shutdown()


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


# Wall time per test file (set-up, call and tear-down of its tests: module fixtures land on the test
# that starts or stops them), printed after --durations' 20 slowest tests: where the suite's budget goes.
_seconds_per_file: dict[str, float] = {}


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    path = report.nodeid.split("::", 1)[0]
    _seconds_per_file[path] = _seconds_per_file.get(path, 0.0) + report.duration


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    if not _seconds_per_file:
        return
    terminalreporter.write_sep("=", "wall time per file")
    for path, seconds in sorted(_seconds_per_file.items(), key=lambda item: item[1], reverse=True):
        terminalreporter.write_line(f"{seconds:8.1f}s {path}")
    terminalreporter.write_line(f"{sum(_seconds_per_file.values()):8.1f}s in all")
