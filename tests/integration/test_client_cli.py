"""`imagegen generate`, `imagegen edit`, `imagegen models` against real servers: files written and
decodable, seeds printed, a progress bar that moves at every denoising step on a terminal, and
one line with the server's message and exit code 1 for each kind of failure."""

from __future__ import annotations

import base64
import fcntl
import io
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time

import httpx
import numpy as np
import openai
import pytest
from helpers import ENDLESS_STREAM, ROOT, TEST_API_KEY, ServerProcess, free_port, poll, queue_held_full, run_cli
from PIL import Image

pytestmark = pytest.mark.slow

DEADLINE_S = 120


def client_env(server: ServerProcess, **extra: str) -> dict[str, str]:
    """The client's variables only: OPENAI_BASE_URL (the server's root; /v1 is added) and what is given."""
    env = {name: value for name, value in os.environ.items() if not name.startswith(("OPENAI_", "IMAGEGEN_API"))}
    return {**env, "OPENAI_BASE_URL": server.base_url, **extra}


def cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "server.cli", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=DEADLINE_S,
        env=env,
    )


def one_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 1, result
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("imagegen: "), result.stderr
    return lines[0]


def png(pixels: np.ndarray, path) -> None:
    Image.fromarray(pixels).save(path)


# -- success ---------------------------------------------------------------------------------------
def test_generate_writes_each_image_and_prints_it_with_its_seed(tiny_server, tmp_path):
    result = cli(
        "generate", "a red circle on a white background", "-o", str(tmp_path / "circle.png"),
        "--n", "2", "--size", "64x64", "--seed", "7", "--steps", "3", env=client_env(tiny_server),
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # no terminal, no bar
    assert result.stdout.splitlines() == [f"{tmp_path / 'circle.png'}\tseed 7", f"{tmp_path / 'circle-1.png'}\tseed 8"]
    # The same images the SDK gets for the same request.
    sdk = openai.OpenAI(base_url=f"{tiny_server.base_url}/v1", api_key="unused", max_retries=0)
    expected = sdk.images.generate(
        prompt="a red circle on a white background", n=2, size="64x64", extra_body={"seed": 7, "num_inference_steps": 3}
    )
    for name, image in zip(("circle.png", "circle-1.png"), expected.data):
        written = np.asarray(Image.open(tmp_path / name).convert("RGB"))
        assert np.array_equal(written, np.asarray(Image.open(io.BytesIO(base64.b64decode(image.b64_json)))))


class TerminalRun:
    """The CLI with stderr on a pseudo-terminal of 100 columns, as a person runs it (stdout stays a pipe)."""

    def __init__(self, args: list[str], env: dict[str, str]):
        self._main, terminal = pty.openpty()
        fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))
        self.process = subprocess.Popen(
            [sys.executable, "-m", "server.cli", *args], cwd=ROOT, env=env, stdin=terminal, stdout=subprocess.PIPE,
            stderr=terminal, text=True,
        )
        os.close(terminal)
        self.seen = ""

    def read_until(self, pattern: str | None = None) -> None:
        """Read what the terminal shows until ``pattern`` appears (None: until the process closes it)."""
        deadline = time.monotonic() + DEADLINE_S
        while pattern is None or not re.search(pattern, self.seen):
            assert time.monotonic() < deadline, f"waited for {pattern!r} on the terminal: {self.seen!r}"
            ready, _, _ = select.select([self._main], [], [], 1)
            if not ready:
                continue
            try:
                chunk = os.read(self._main, 65536)
            except OSError:  # EIO: the process has closed the terminal
                chunk = b""
            if not chunk:
                assert pattern is None, f"the terminal closed before {pattern!r}: {self.seen!r}"
                return
            self.seen += chunk.decode(errors="replace")

    def finish(self) -> tuple[int, str]:
        """The exit code and stdout, once the process is done."""
        self.read_until(None)
        os.close(self._main)
        stdout = self.process.stdout.read()
        return self.process.wait(DEADLINE_S), stdout


def test_progress_bar_on_a_terminal_moves_at_every_denoising_step(tiny_server, tmp_path):
    run = TerminalRun(
        ["generate", "a fox", "-o", str(tmp_path / "fox.png"), "--size", "64x64", "--steps", "6", "--seed", "1"],
        client_env(tiny_server),
    )
    code, stdout = run.finish()
    terminal = run.seen
    assert code == 0, terminal
    assert stdout == f"{tmp_path / 'fox.png'}\tseed 1\n"
    # tqdm redraws "k/6 [" at each progress event, one per denoising step.
    drawn = [int(k) for k, total in re.findall(r"(\d+)/(\d+) \[", terminal) if total == "6"]
    assert sorted(set(drawn)) == [1, 2, 3, 4, 5, 6] and drawn == sorted(drawn), terminal


def test_edit_with_a_mask_writes_the_format_of_the_file_name(tiny_server, tmp_path):
    image = tmp_path / "in.png"
    png(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8), image)
    mask = np.full((64, 64, 4), 255, np.uint8)
    mask[:, 32:, 3] = 0  # repaint the right half
    png(mask, tmp_path / "mask.png")
    result = cli(
        "edit", str(image), "a cat", "--mask", str(tmp_path / "mask.png"), "-o", str(tmp_path / "out.jpg"),
        "--steps", "4", "--strength", "0.5", "--seed", "3", env=client_env(tiny_server),
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{tmp_path / 'out.jpg'}\tseed 3\n"
    written = (tmp_path / "out.jpg").read_bytes()
    assert written.startswith(b"\xff\xd8") and Image.open(io.BytesIO(written)).size == (64, 64)


def test_models_lists_the_served_model(tiny_server):
    result = cli("models", env=client_env(tiny_server))
    assert result.returncode == 0, result.stderr
    (line,) = result.stdout.splitlines()
    name, status, memory, size, tasks = line.split("\t")
    assert (name, status, size, tasks) == ("tiny", "loaded", "default size 64x64", "tasks img2img, inpaint, text2img")
    assert memory.startswith("memory cpu ") and memory.endswith(" MiB")


# -- failures --------------------------------------------------------------------------------------
def test_connection_refused_is_one_line(tmp_path):
    result = run_cli(
        "generate", "a fox", "-o", str(tmp_path / "fox.png"), "--url", f"http://127.0.0.1:{free_port()}",
        "--max-retries", "0",
    )
    line = one_error_line(result)
    assert "cannot reach the server" in line and "Connection refused" in line


def test_missing_or_wrong_key_is_the_servers_401_message(keyed_server, tmp_path):
    args = ("generate", "a fox", "-o", str(tmp_path / "fox.png"), "--steps", "2")
    wrong = one_error_line(cli(*args, env=client_env(keyed_server, OPENAI_API_KEY="sk-wrong")))
    assert wrong == "imagegen: the server answered 401: Incorrect API key provided."
    missing = one_error_line(cli(*args, env=client_env(keyed_server)))
    assert "401" in missing and "no API key was given: set OPENAI_API_KEY or --api-key" in missing
    # The key from the flag wins, and IMAGEGEN_API_KEY (the server's list) is not the client's.
    right = cli(*args, "--api-key", TEST_API_KEY, env=client_env(keyed_server, IMAGEGEN_API_KEY=TEST_API_KEY))
    assert right.returncode == 0, right.stderr
    assert one_error_line(cli(*args, env=client_env(keyed_server, IMAGEGEN_API_KEY=TEST_API_KEY))).startswith(
        "imagegen: the server answered 401"
    )


def test_bad_size_is_the_servers_400_message(keyed_server, tmp_path):
    line = one_error_line(
        cli("generate", "a fox", "-o", str(tmp_path / "x.png"), "--size", "65x65",
            env=client_env(keyed_server, OPENAI_API_KEY=TEST_API_KEY))
    )
    assert line.startswith("imagegen: the server answered 400: size 65x65 is not supported")
    assert not (tmp_path / "x.png").exists()


def test_busy_server_is_429_after_the_retries(keyed_server, tmp_path):
    with queue_held_full(keyed_server, {"Authorization": f"Bearer {TEST_API_KEY}"}):
        rejected = keyed_server.metric("imagegen_requests_rejected_total")
        result = cli("generate", "a fox", "-o", str(tmp_path / "fox.png"), "--max-retries", "1",
                     env=client_env(keyed_server, OPENAI_API_KEY=TEST_API_KEY))
        line = one_error_line(result)
        assert line.startswith("imagegen: the server answered 429: The server is busy")
        # Asked twice: once, and once more after the Retry-After.
        assert keyed_server.metric("imagegen_requests_rejected_total") == rejected + 2


def test_draining_server_is_the_servers_503_message(tmp_path):
    server = ServerProcess("--model", "tiny", "--max-num-inference-steps", "100000")
    http = httpx.Client(timeout=DEADLINE_S)
    try:
        running = http.send(http.build_request("POST", f"{server.base_url}/v1/images/generations", json=ENDLESS_STREAM),
                            stream=True)
        server.process.send_signal(signal.SIGTERM)  # drains: what runs may finish, new work is refused
        poll(lambda: httpx.get(f"{server.base_url}/ready", timeout=5).status_code == 503, 30, "the drain")
        line = one_error_line(
            cli("generate", "a fox", "-o", str(tmp_path / "fox.png"), "--max-retries", "0", env=client_env(server))
        )
        assert line == "imagegen: the server answered 503: the server is shutting down"
        running.close()
    finally:
        http.close()
        server.stop()


def test_failure_after_the_stream_began_is_one_line(tmp_path):
    server = ServerProcess("--model", "tiny", "--max-num-inference-steps", "100000")
    try:
        run = TerminalRun(
            ["generate", "a fox", "-o", str(tmp_path / "fox.png"), "--size", "64x64", "--steps", "100000"],
            client_env(server),
        )
        # The bar has moved: the 200 is sent, so the failure can only come as the stream's error event.
        run.read_until(r"\d+/100000 \[")
        (worker,) = server.worker_pids()
        os.kill(worker, signal.SIGKILL)
        code, stdout = run.finish()
        assert (code, stdout) == (1, "")
        last_line = run.seen.splitlines()[-1]  # after the bar's last redraw
        assert last_line.startswith("imagegen: the generation failed: worker rank 0 died (killed by SIGKILL)")
        assert not (tmp_path / "fox.png").exists()
    finally:
        server.stop()
