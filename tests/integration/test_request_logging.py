"""X-Request-ID and one structured log line per request, from the real server."""

from __future__ import annotations

import json

import pytest
from helpers import ServerProcess, poll

pytestmark = pytest.mark.slow


def json_lines(text: str) -> list[dict]:
    lines = []
    for line in text.splitlines():
        if line.startswith("{"):
            lines.append(json.loads(line))
    return lines


def test_json_logs_one_line_per_request_with_the_request_id():
    server = ServerProcess("--log-format", "json")
    try:
        given = server.post(num_inference_steps=2, n=2, timeout=60, headers={"X-Request-ID": "client-id.42"})
        assert given.status_code == 200
        assert given.headers["x-request-id"] == "client-id.42"
        fresh = server.post(num_inference_steps=2, timeout=60)
        generated = fresh.headers["x-request-id"]
        assert len(generated) == 32 and generated != "client-id.42"
        bad = server.post(prompt="", timeout=60, headers={"X-Request-ID": "not a token\t!"})
        assert bad.status_code == 400 and bad.headers["x-request-id"] != "not a token\t!"

        def request_lines() -> list[dict]:
            return [line for line in json_lines(server.output()) if line["logger"] == "imagegen.requests"]

        ids = {"client-id.42", generated, bad.headers["x-request-id"]}
        # The line is written once the response has gone out, so it may trail the response a little.
        poll(lambda: ids <= {line["request_id"] for line in request_lines()}, 10, "the request log lines")
        by_id = {line["request_id"]: line for line in request_lines()}
        line = by_id["client-id.42"]
        assert (line["status"], line["images"], line["path"]) == (200, 2, "/v1/images/generations")
        assert line["queue_time_s"] >= 0 and line["inference_time_s"] > 0 and line["duration_s"] >= line["inference_time_s"]
        assert by_id[generated]["status"] == 200
        assert by_id[bad.headers["x-request-id"]]["status"] == 400
        # Every line is JSON, the worker's and uvicorn's too.
        not_json = [line for line in server.output().splitlines() if line.strip() and not line.startswith("{")]
        assert not_json == []
        assert any(line["message"].startswith("rank 0 loaded") for line in json_lines(server.output()))
    finally:
        server.stop()


def test_text_logs_carry_the_request_id(tiny_server):
    response = tiny_server.post(num_inference_steps=2, timeout=60, headers={"X-Request-ID": "text-line-7"})
    assert response.status_code == 200
    poll(lambda: "request_id=text-line-7 " in tiny_server.output(), 10, "the request log line")
    line = next(line for line in tiny_server.output().splitlines() if "request_id=text-line-7 " in line)
    assert "status=200" in line and "images=1" in line
