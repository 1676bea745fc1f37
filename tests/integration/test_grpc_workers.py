"""Backend grpc against real `imagegen worker` processes on 127.0.0.1 (the tiny model, CPU), with the
official openai client at the front where a test goes through HTTP."""

from __future__ import annotations

import concurrent.futures
import os
import re
import signal
import socket
import time

import grpc
import httpx
import numpy as np
import openai
import pytest
from google.protobuf.message import DecodeError
from helpers import (
    TESTS,
    ServerProcess,
    WorkerProcess,
    assert_pixels_close,
    free_port,
    poll,
    run_cli,
    scheduling_by_default,
    start_workers,
)
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from lora_adapters import make_lora

from engine import DiffusionEngine, OmniDiffusionConfig, OmniDiffusionRequest, RequestTimeoutError
from executors import WorkerRpcError, WorkerStartupError
from workers.hosts.grpc_messages import CONTRACT_VERSION, REQUEST_FIELDS_SINCE, pixels_to_proto, request_to_proto
from workers.hosts.proto import worker_pb2 as pb
from workers.hosts.proto import worker_pb2_grpc as pb_grpc

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def request_mode():
    """Request mode's data parallel (one step sharded across both workers) and its pipeline calls; step mode
    on gRPC workers is tested in test_step_mode_backends.py."""
    with scheduling_by_default("request"):
        yield

TOKEN = "grpc-test-token"
AUTH = (("authorization", f"Bearer {TOKEN}"),)
METHODS = ("Initialize", "Generate", "Cancel", "GetRank", "ExecuteRpc", "Shutdown")


@pytest.fixture(scope="module")
def workers():
    """Two ranks that require TOKEN and outlive every engine and server built on them."""
    group = start_workers(2, "--model", "tiny", env={"IMAGEGEN_WORKER_TOKEN": TOKEN})
    yield group
    for worker in group:
        worker.stop()


def grpc_config(workers, **settings) -> OmniDiffusionConfig:
    settings.setdefault("worker_token", TOKEN)
    settings.setdefault("worker_addresses", [worker.address for worker in workers])
    settings.setdefault("num_gpus", len(workers))
    return OmniDiffusionConfig(model="tiny", distributed_executor_backend="grpc", **settings)


def server_flags(workers) -> tuple[str, ...]:
    addresses = ",".join(worker.address for worker in workers)
    return ("--backend", "grpc", "--worker-addresses", addresses, "--num-gpus", str(len(workers)))


def requests_for(seeds, **fields) -> list[OmniDiffusionRequest]:
    fields.setdefault("num_inference_steps", 4)
    return [OmniDiffusionRequest("a red fox", 64, 64, seed=seed, **fields) for seed in seeds]


def pixels(outputs) -> list[np.ndarray]:
    return [np.asarray(image, dtype=np.int16) for output in outputs for image in output.images]


def stub(worker: WorkerProcess) -> tuple[grpc.Channel, pb_grpc.DiffusionWorkerStub]:
    channel = grpc.insecure_channel(worker.address)
    return channel, pb_grpc.DiffusionWorkerStub(channel)


# -- results ----------------------------------------------------------------------------------------
def test_same_seeds_give_the_same_pixels_on_grpc_as_on_mp(workers):
    requests = requests_for(range(20, 24))
    with DiffusionEngine(OmniDiffusionConfig(model="tiny", num_gpus=2)) as mp_engine:
        on_mp = mp_engine.step(requests)
    with DiffusionEngine(grpc_config(workers)) as engine:
        on_grpc = engine.step(requests)
        # Alone, the request no longer shares its pipeline call: the batch differs, so the tolerance applies.
        (alone,) = engine.step(requests[1:2])
    assert [o.rank for o in on_grpc] == [o.rank for o in on_mp] == [0, 0, 1, 1]
    # The same requests in the same batches on each rank: exactly the same pixels.
    assert all(np.array_equal(a, b) for a, b in zip(pixels(on_mp), pixels(on_grpc), strict=True))
    assert_pixels_close(pixels([alone])[0], pixels(on_mp[1:2])[0])


def test_collective_rpc_takes_json_to_an_allow_list_and_names_the_rank(workers):
    with DiffusionEngine(grpc_config(workers)) as engine:
        assert engine.collective_rpc("get_rank") == [0, 1]
        assert engine.collective_rpc("get_rank", unique_reply_rank=1) == 1
        assert engine.model_info["native_size"] == "64x64" and engine.executor.worker_info[1]["rank"] == 1
        assert any("serving StableDiffusionPipeline" in line for line in engine.collective_rpc("get_logs")[1])
        with pytest.raises(WorkerRpcError, match=r"worker rank 0 .*cannot be called through ExecuteRpc"):
            engine.collective_rpc("_generate_group", args=([],))
        with pytest.raises(WorkerRpcError, match="JSON values only"):
            engine.collective_rpc("describe", args=(np.zeros(2),))
        with pytest.raises(WorkerRpcError, match="TypeError"):
            engine.collective_rpc("get_rank", args=(1, 2))
        assert engine.collective_rpc("get_rank") == [0, 1]  # the workers live on after the errors


def test_cancel_reaches_a_generation_while_it_runs(workers):
    with DiffusionEngine(grpc_config(workers)) as engine:
        # Minutes of denoising on this machine if it ran to the end.
        long = OmniDiffusionRequest("a red fox", 128, 128, num_inference_steps=150, seed=1)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            step = pool.submit(engine.step, [long])
            engine.cancel([long.request_id])
            (output,) = step.result(timeout=60)
        assert output.images == [] and "cancelled" in output.error


def test_a_hung_worker_fails_only_its_share_with_504_and_its_group_is_set_aside(workers):
    engine = DiffusionEngine(grpc_config(workers, rpc_timeout_s=3, health_check_interval_s=1))
    os.kill(workers[1].process.pid, signal.SIGSTOP)
    try:
        # Two requests, one per rank group: rank 1's share fails, rank 0's is served.
        served, failed = engine.step(requests_for([1, 2]))
        assert isinstance(failed.failure, RequestTimeoutError)
        assert re.search(r"timed out after 3s waiting for rank 1", failed.error)
        assert served.error is None and served.rank == 0 and len(served.images) == 1
        assert set(engine.rank_groups.set_aside_ranks()) == {1} and engine.rank_groups.serving() == [0]
        (later,) = engine.step(requests_for([3]))
        assert later.rank == 0 and later.error is None
    finally:
        os.kill(workers[1].process.pid, signal.SIGCONT)
    # A worker the engine does not own is re-admitted by the probe once it answers SERVING again.
    poll(lambda: engine.rank_groups.serving() == [0, 1], 30, "the probe to re-admit rank 1")
    assert engine.fatal_error is None
    engine.close()


# -- contract versions -----------------------------------------------------------------------------
def test_a_worker_and_a_server_of_this_commit_speak_the_same_contract_version(workers):
    channel, worker_stub = stub(workers[0])
    with channel:
        reply = worker_stub.Initialize(pb.InitializeRequest(), timeout=30, metadata=AUTH)
    assert reply.contract_version == CONTRACT_VERSION


@pytest.fixture(scope="module")
def two_adapters(model_cache, tmp_path_factory) -> tuple[str, ...]:
    root = tmp_path_factory.mktemp("contract-loras")
    return tuple(f"{name}={make_lora(root / name, model_cache, seed=seed)}" for seed, name in enumerate(("a", "b")))


def test_a_worker_too_old_for_a_field_fails_the_requests_that_set_it_naming_the_versions(two_adapters):
    old = WorkerProcess(0, "--model", "tiny", program=(str(TESTS / "old_contract_worker.py"),))
    try:
        server = ServerProcess("--model", "tiny", "--backend", "grpc", "--worker-addresses", old.address,
                               "--lora-modules", *two_adapters)
        try:
            body = {"num_inference_steps": 2, "seed": 1}
            both = server.post(loras=[{"name": "a"}, {"name": "b"}], **body)
            one = server.post(model="a", **body)  # the one-adapter form every version reads
        finally:
            server.stop()
    finally:
        old.stop()
    assert both.status_code == 500, both.text
    needed = REQUEST_FIELDS_SINCE["loras"]
    assert (
        f"speaks worker contract version {needed - 1}, and this request needs version {needed} for its field 'loras'"
    ) in both.json()["error"]["message"]
    assert one.status_code == 200, one.text


# -- start-up -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "change, message",
    [
        ({"worker_token": "wrong"}, "refused the worker token"),
        ({"worker_token": None}, "refused the worker token"),
        ("reversed", "is rank 1 but is listed at position 0: list the workers in rank order"),
        ({"served_model_name": "other"}, "serves model 'tiny' but this server serves 'other'"),
        ("first only", "was started for 2 ranks .* but this server has 1"),
        ("nobody there", r"did not report SERVING within 1s \(nothing answered\)"),
    ],
)
def test_each_startup_mismatch_is_one_clear_line(workers, change, message):
    if change == "reversed":
        change = {"worker_addresses": [workers[1].address, workers[0].address]}
    elif change == "first only":
        change = {"worker_addresses": [workers[0].address], "num_gpus": 1}
    elif change == "nobody there":
        change = {"worker_addresses": [f"127.0.0.1:{free_port()}"], "num_gpus": 1, "worker_start_timeout_s": 1}
    with pytest.raises(WorkerStartupError, match=message) as error:
        DiffusionEngine(grpc_config(workers, **change))
    assert "\n" not in str(error.value)


def test_server_with_the_wrong_token_exits_with_one_line_saying_token(workers):
    result = run_cli("serve", *server_flags(workers), env={"IMAGEGEN_WORKER_TOKEN": "wrong"}, timeout=120)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("imagegen: could not start model") and "token" in last, result.stderr


# -- lifecycle ------------------------------------------------------------------------------------
def generate_through_a_server(workers) -> list[str]:
    """Start a server on the workers, generate with the openai client, stop it (exit 0): the images."""
    server = ServerProcess(*server_flags(workers), env={"IMAGEGEN_WORKER_TOKEN": TOKEN})
    try:
        client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)
        response = client.images.generate(
            prompt="a red fox", size="64x64", n=2, extra_body={"seed": 11, "num_inference_steps": 4}
        )
    finally:
        server.stop()
    assert server.process.returncode == 0
    return [image.b64_json for image in response.data]


def test_a_stopped_server_leaves_the_workers_serving_and_a_second_server_connects(workers):
    before = generate_through_a_server(workers)
    assert [worker.health() for worker in workers] == ["SERVING", "SERVING"]
    assert generate_through_a_server(workers) == before


def test_killed_worker_fails_inflight_with_503_then_the_server_reconnects():
    workers = start_workers(2, "--model", "tiny")
    server = None
    try:
        server = ServerProcess(*server_flags(workers))
        url = f"{server.base_url}/v1/images/generations"
        # One request of two images goes to rank 1 (its middle image is there); long enough to be killed in.
        long = {"prompt": "a red fox", "size": "128x128", "n": 2, "num_inference_steps": 150, "seed": 1}
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            response = pool.submit(httpx.post, url, json=long, timeout=120)
            poll(lambda: server.metric("imagegen_num_requests_running") == 1, 60, "the request to run")
            killed_at = time.monotonic()
            workers[1].kill()
            failed = response.result(timeout=60)
            failed_after_s = time.monotonic() - killed_at
        assert failed.status_code == 503 and "rank 1" in failed.json()["error"]["message"]
        assert failed_after_s < 5
        # Rank 0's group still serves: the server is alive and ready, and says which rank is set aside.
        assert httpx.get(f"{server.base_url}/ready", timeout=30).status_code == 200
        health = httpx.get(f"{server.base_url}/health", timeout=30).json()
        assert [entry["rank"] for entry in health["set_aside"]] == [1]

        # Its orchestrator starts rank 1 again on the same port: the probe re-admits it by itself.
        workers[1] = WorkerProcess(1, "--num-gpus", "2", "--model", "tiny", port=workers[1].port)
        poll(lambda: server.metric("imagegen_rank_groups", state="serving") == 2, 60, "the re-admission")
        client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)
        again = client.images.generate(prompt="a red fox", size="64x64", n=2, extra_body={"num_inference_steps": 4})
        assert len(again.data) == 2
    finally:
        if server is not None:
            server.stop()
        for worker in workers:
            worker.stop()


def test_sigterm_finishes_the_generation_in_flight_then_exits_zero():
    (worker,) = start_workers(1, "--model", "tiny")
    channel, worker_stub = stub(worker)
    try:
        (request,) = requests_for([3], num_inference_steps=64, partial_images=1)
        events = worker_stub.Generate(pb.GenerateRequest(requests=[request_to_proto(request)]), timeout=120)
        # The first partial image proves the generation runs; SIGTERM arrives in its middle.
        assert next(events).HasField("partial_image")
        worker.process.send_signal(signal.SIGTERM)
        poll(lambda: worker.health() != "SERVING", 30, "the worker to stop taking calls")
        (reply,) = list(events)
        (output,) = reply.reply.outputs
        assert output.error == "" and len(output.images) == 1
        assert worker.process.wait(60) == 0
    finally:
        channel.close()
        worker.stop()


# -- the wire -------------------------------------------------------------------------------------
def test_calls_without_the_token_are_refused_but_health_answers(workers):
    channel, worker_stub = stub(workers[0])
    with channel:
        for metadata in ((), (("authorization", "Bearer wrong"),), (("authorization", TOKEN),)):
            with pytest.raises(grpc.RpcError) as error:
                worker_stub.GetRank(pb.GetRankRequest(), timeout=10, metadata=metadata)
            assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert worker_stub.GetRank(pb.GetRankRequest(), timeout=10, metadata=AUTH).rank == 0
    assert workers[0].health() == "SERVING"


def test_malformed_messages_get_invalid_argument(workers):
    bad_pixels = request_to_proto(requests_for([1])[0])
    bad_pixels.image.CopyFrom(pb.Pixels(shape=[64, 64, 3], data=b"\0" * 10))
    channel, worker_stub = stub(workers[0])
    with channel:
        calls = [
            (lambda: list(worker_stub.Generate(pb.GenerateRequest(requests=[bad_pixels]), timeout=10, metadata=AUTH)),
             "cannot hold"),
            (lambda: worker_stub.ExecuteRpc(pb.ExecuteRpcRequest(method="shutdown"), timeout=10, metadata=AUTH),
             "cannot be called through ExecuteRpc"),
            (lambda: worker_stub.ExecuteRpc(pb.ExecuteRpcRequest(method="get_rank", args_json="{"), timeout=10,
                                            metadata=AUTH), "not JSON"),
            (lambda: worker_stub.ExecuteRpc(pb.ExecuteRpcRequest(method="get_rank", args_json="{}"), timeout=10,
                                            metadata=AUTH), "JSON array"),
        ]
        for call, message in calls:
            with pytest.raises(grpc.RpcError) as error:
                call()
            assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in error.value.details()
    assert workers[0].health() == "SERVING"


def test_garbage_on_the_worker_port_never_crashes_it(workers):
    for garbage in (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", os.urandom(4096), b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\xff" * 64):
        with socket.create_connection(("127.0.0.1", workers[0].port), timeout=10) as sock:
            sock.sendall(garbage)
            try:
                while sock.recv(4096):
                    pass
            except (ConnectionResetError, TimeoutError):
                pass
    assert workers[0].health() == "SERVING"


@settings(max_examples=60, deadline=None)
@given(method=st.sampled_from(METHODS), body=st.binary(max_size=300), authenticated=st.booleans())
def test_fuzzed_grpc_requests_never_crash_the_worker(workers, method, body, authenticated):
    if authenticated:
        # Bytes that decode into real work are a real request, not garbage: a Shutdown, or requests to generate.
        assume(method != "Shutdown")
        if method == "Generate":
            try:
                assume(not pb.GenerateRequest.FromString(body).requests)
            except DecodeError:
                pass  # undecodable: garbage indeed
    worker = workers[1]
    with grpc.insecure_channel(worker.address) as channel:
        path = f"/imagegen.worker.v1.DiffusionWorker/{method}"
        # No serializers: the bytes go out as they are.
        call = channel.unary_stream(path) if method == "Generate" else channel.unary_unary(path)
        try:
            reply = call(body, timeout=10, metadata=AUTH if authenticated else ())
            if method == "Generate":
                list(reply)
        except grpc.RpcError as error:
            assert error.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED), error
            if not authenticated:
                assert error.code() == grpc.StatusCode.UNAUTHENTICATED
        else:
            assert authenticated, "an unauthenticated call got an answer"
        answer = pb_grpc.DiffusionWorkerStub(channel).GetRank(pb.GetRankRequest(), timeout=10, metadata=AUTH)
        assert answer.rank == 1


# -- large messages -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def large_image_worker(tmp_path_factory):
    """One rank of the tiny model with its attention layers taken out: at 1024x1024 the tiny VAE's
    mid-block attention would span 262,144 latent positions, which a CPU cannot run in test time."""
    import torch
    from diffusers import UNet2DConditionModel

    from workers.models.tiny import build_tiny_sd, tiny_vae

    folder = tmp_path_factory.mktemp("no-attention-tiny")
    torch.manual_seed(0)
    pipeline = build_tiny_sd()
    pipeline.unet = UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=32, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        mid_block_type=None, cross_attention_dim=32, norm_num_groups=8,
    )
    pipeline.vae = tiny_vae(8, mid_block_add_attention=False)
    pipeline.save_pretrained(folder, safe_serialization=True)
    (worker,) = start_workers(1, "--model", str(folder), "--max-batch-size", "8")
    yield worker, str(folder)
    worker.stop()


def test_a_reply_of_four_1024x1024_images_comes_back(large_image_worker):
    worker, model = large_image_worker
    config = OmniDiffusionConfig(model=model, distributed_executor_backend="grpc", worker_addresses=[worker.address])
    with DiffusionEngine(config) as engine:
        (output,) = engine.step([OmniDiffusionRequest("a red fox", 1024, 1024, num_inference_steps=1, seed=1, num_images=4)])
    assert output.error is None
    assert [image.size for image in output.images] == [(1024, 1024)] * 4  # 12.6 MB of pixels in one reply
    assert len({image.tobytes() for image in output.images}) == 4


def test_a_step_of_eight_1792x1024_edits_with_masks_goes_out(large_image_worker):
    """58.7 MB of images and masks in one Generate. One denoising step times strength 0.5 is no step at
    all, which the pipeline refuses at once: every request comes back, by its id, with that error."""
    worker, model = large_image_worker
    rng = np.random.default_rng(0)
    edits = [
        OmniDiffusionRequest(
            "a red fox", 1024, 1792, num_inference_steps=1, seed=seed, strength=0.5,
            images=[rng.integers(0, 256, (1024, 1792, 3), dtype=np.uint8)], mask=np.full((1024, 1792), 255, np.uint8),
        )
        for seed in range(8)
    ]
    config = OmniDiffusionConfig(model=model, distributed_executor_backend="grpc", worker_addresses=[worker.address])
    with DiffusionEngine(config) as engine:
        # Straight to the executor: the engine's collective_rpc would refuse these requests before sending.
        (outputs,) = engine.executor.collective_rpc("generate", args=(edits,))
    assert [output.request_id for output in outputs] == [edit.request_id for edit in edits]
    assert all(output.error and output.images == [] for output in outputs)
    assert sum(len(pixels_to_proto(e.images[0]).data) + len(pixels_to_proto(e.mask).data) for e in edits) > 58_000_000


# -- TLS ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    """A self-made CA and a certificate for 127.0.0.1 that it signed."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    folder = tmp_path_factory.mktemp("tls")
    now = datetime.datetime.now(datetime.timezone.utc)

    def certificate(subject: str, key, issuer: str, issuer_key, ca: bool):
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if not ca:
            names = [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        return builder.sign(issuer_key, hashes.SHA256())

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = certificate("imagegen test CA", ca_key, "imagegen test CA", ca_key, ca=True)
    cert = certificate("127.0.0.1", key, "imagegen test CA", ca_key, ca=False)
    (folder / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (folder / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / "key.pem").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return folder


@pytest.fixture(scope="module")
def tls_worker(tls_files):
    """One rank on TLS, its health on a plaintext port, and a 2 s rpc_timeout_s for the hang watch."""
    health_port = free_port()
    worker = WorkerProcess(
        0, "--model", "tiny", "--tls-cert", str(tls_files / "cert.pem"), "--tls-key", str(tls_files / "key.pem"),
        "--health-port", str(health_port), "--rpc-timeout-s", "2", wait=False,
    )
    worker.health_port = health_port
    worker.wait_serving(port=health_port)
    yield worker
    worker.stop()


def test_tls_worker_serves_a_server_that_trusts_its_ca(tls_worker, tls_files):
    config = OmniDiffusionConfig(
        model="tiny", distributed_executor_backend="grpc", worker_addresses=[tls_worker.address],
        worker_tls_ca=tls_files / "ca.pem",
    )
    # Without TLS the port does not answer; the plaintext health port does, for the kubelet's probe. Asked
    # while the worker idles: a step that runs past the worker's 2 s rpc_timeout_s on a loaded machine
    # turns it NOT_SERVING for a while (the next test's subject).
    assert tls_worker.health() == "UNAVAILABLE"
    assert tls_worker.health(port=tls_worker.health_port) == "SERVING"
    with DiffusionEngine(config) as engine:
        (output,) = engine.step(requests_for([5]))
        assert output.error is None and output.images[0].size == (64, 64)


def test_a_pipeline_call_past_rpc_timeout_turns_health_not_serving(tls_worker, tls_files):
    """The server has given up on such a call (504); a liveness probe that sees NOT_SERVING replaces the worker."""
    credentials = grpc.ssl_channel_credentials(root_certificates=(tls_files / "ca.pem").read_bytes())
    long = OmniDiffusionRequest("a red fox", 128, 128, num_inference_steps=150, seed=1)
    with grpc.secure_channel(tls_worker.address, credentials) as channel:
        worker_stub = pb_grpc.DiffusionWorkerStub(channel)
        events = worker_stub.Generate(pb.GenerateRequest(requests=[request_to_proto(long)]), timeout=120)
        try:
            poll(lambda: tls_worker.health(port=tls_worker.health_port) == "NOT_SERVING", 30, "NOT_SERVING")
        finally:
            worker_stub.Cancel(pb.CancelRequest(request_ids=[long.request_id]), timeout=10)
        (output,) = next(events).reply.outputs
        assert "cancelled" in output.error
    poll(lambda: tls_worker.health(port=tls_worker.health_port) == "SERVING", 30, "SERVING again")
