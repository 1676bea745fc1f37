"""The gRPC worker's pieces that need no worker: generated code, message conversion, settings, CLI."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import sys

import numpy as np
import pytest
from helpers import ROOT, run_cli

from executors import WorkerStartupError, get_executor_class
from executors.grpc_external import GrpcExternalDiffusionExecutor, expand_addresses
from server.cli import build_parser
from workers.config import OmniDiffusionConfig
from workers.data import (
    EncodedImage,
    LoraWeight,
    OmniDiffusionRequest,
    PartialImageOutput,
    RequestOutput,
    RunningSetIteration,
    Usage,
)
from workers.hosts.grpc_messages import (
    CONTRACT_VERSION,
    ENCODING_SINCE,
    REQUEST_FIELDS_SINCE,
    ContractVersionError,
    check_contract_version,
    output_from_proto,
    output_to_proto,
    pixels_from_proto,
    request_from_proto,
    request_to_proto,
    running_set_iteration_from_proto,
    running_set_iteration_to_proto,
    without_encoding,
    worker_contract_version,
)
from workers.hosts.grpc_server import check_listen_settings, rank_from_hostname
from workers.hosts.proto import worker_pb2 as pb

PROTO_DIR = ROOT / "workers" / "hosts" / "proto"


def test_committed_generated_code_matches_the_proto(tmp_path):
    """Regenerate with the pinned grpcio-tools and compare byte for byte: stale code fails here."""
    (tmp_path / "workers" / "hosts" / "proto").mkdir(parents=True)
    shutil.copy(PROTO_DIR / "worker.proto", tmp_path / "workers" / "hosts" / "proto")
    command = [sys.executable, "-m", "grpc_tools.protoc", "-I.", "--python_out=.", "--pyi_out=.",
               "--grpc_python_out=.", "workers/hosts/proto/worker.proto"]
    subprocess.run(command, cwd=tmp_path, check=True, capture_output=True)
    for name in ("worker_pb2.py", "worker_pb2.pyi", "worker_pb2_grpc.py"):
        generated = (tmp_path / "workers" / "hosts" / "proto" / name).read_text()
        assert generated == (PROTO_DIR / name).read_text(), f"{name} is stale: run `make proto`"


def test_every_message_has_a_comment():
    lines = (PROTO_DIR / "worker.proto").read_text().splitlines()
    for number, line in enumerate(lines):
        if line.startswith(("message ", "service ")):
            assert lines[number - 1].startswith("//"), f"no comment above {line!r}"


def full_request(**changes) -> OmniDiffusionRequest:
    """A request with every field set to something other than its default."""
    fields = dict(
        prompt="a red fox",
        height=48,
        width=64,
        negative_prompt="blurry",
        num_inference_steps=7,
        guidance_scale=6.25,
        seed=(11, 12),
        num_images=2,
        request_id="req-1",
        images=[np.arange(48 * 64 * 3, dtype=np.uint8).reshape(48, 64, 3), np.zeros((32, 16, 3), np.uint8)],
        mask=np.full((48, 64), 255, dtype=np.uint8),
        strength=0.375,
        partial_images=2,
        progress=True,
        cache=False,
        loras=(LoraWeight("sharp", 0.3), LoraWeight("pastel")),
        input_fidelity="high",
        output_format="webp",
        output_compression=40,
    )
    fields.update(changes)
    return OmniDiffusionRequest(**fields)


def test_every_request_field_crosses_the_wire():
    request = full_request()
    defaults = OmniDiffusionRequest("p")
    for field in dataclasses.fields(request):
        assert not np.array_equal(getattr(request, field.name), getattr(defaults, field.name)), field.name
    # lora_name and lora_scale, image: the one-adapter and one-image forms that workers before loras and images read.
    assert {f.name for f in dataclasses.fields(request)} | {"lora_name", "lora_scale", "image"} == set(
        pb.DiffusionRequest.DESCRIPTOR.fields_by_name
    )
    back = request_from_proto(pb.DiffusionRequest.FromString(request_to_proto(request).SerializeToString()))
    assert back == request
    assert len(back.images) == 2 and np.array_equal(back.mask, request.mask)
    assert all(np.array_equal(b, r) for b, r in zip(back.images, request.images, strict=True))


def test_unset_fields_stay_none_and_an_int_seed_stays_an_int():
    request = OmniDiffusionRequest("a red fox", seed=5, request_id="r")
    back = request_from_proto(pb.DiffusionRequest.FromString(request_to_proto(request).SerializeToString()))
    assert back == request and back.seed == 5 and back.height is None and back.images == ()


def test_one_adapter_travels_in_the_form_every_worker_reads():
    message = request_to_proto(full_request(loras=(LoraWeight("sharp", 0.3),)))
    assert (message.lora_name, message.lora_scale) == ("sharp", 0.3) and not message.loras
    assert request_from_proto(message).loras == (LoraWeight("sharp", 0.3),)
    message.ClearField("lora_scale")
    assert request_from_proto(message).loras == (LoraWeight("sharp"),)
    assert not request_to_proto(full_request()).HasField("lora_name")  # two adapters have no such form


def test_one_image_travels_in_the_form_every_worker_reads():
    (image,) = full_request(images=[np.full((8, 16, 3), 7, np.uint8)]).images
    message = request_to_proto(full_request(images=[image]))
    assert message.HasField("image") and not message.images
    (back,) = request_from_proto(message).images
    assert np.array_equal(back, image)
    assert not request_to_proto(full_request()).HasField("image")  # two images go in images, in order


def test_a_worker_too_old_for_a_field_is_refused_naming_the_versions_and_the_field():
    # Requests with the encode fields unset: those fields have a test of their own (version 5).
    def before_encoding(**changes):
        return full_request(output_format="png", output_compression=None, **changes)

    two = request_to_proto(before_encoding(input_fidelity=None, images=before_encoding().images[:1]))
    needed = REQUEST_FIELDS_SINCE["loras"]
    message = (
        rf"the worker at w speaks worker contract version {needed - 1}, and this request needs version {needed} "
        rf"for its field 'loras' \(this server speaks {CONTRACT_VERSION}\)"
    )
    with pytest.raises(ContractVersionError, match=message):
        check_contract_version(two, needed - 1, "the worker at w")
    check_contract_version(two, CONTRACT_VERSION, "the worker at w")
    check_contract_version(
        request_to_proto(before_encoding(loras=(LoraWeight("sharp"),), input_fidelity=None, images=[])),
        1,
        "the worker at w",
    )
    # An edit model's input_fidelity is version 3: a version-2 worker is never sent it.
    with pytest.raises(ContractVersionError, match=r"version 2, and this request needs version 3 .*'input_fidelity'"):
        check_contract_version(request_to_proto(before_encoding(images=())), 2, "the worker at w")
    # Several reference images are version 4; one travels as `image`, which every version reads.
    with pytest.raises(ContractVersionError, match=r"version 3, and this request needs version 4 .*'images'"):
        check_contract_version(request_to_proto(before_encoding()), 3, "the worker at w")
    check_contract_version(request_to_proto(before_encoding(images=before_encoding().images[:1])), 3, "the worker at w")
    # A worker from before InitializeReply had the field speaks version 1.
    assert worker_contract_version(pb.InitializeReply()) == 1


def test_adapters_travel_in_their_canonical_order():
    written = full_request(loras=(LoraWeight("zeta", 0.5), LoraWeight("alpha", 2.0)))
    assert [lora.name for lora in written.loras] == ["alpha", "zeta"]
    assert [lora.name for lora in request_to_proto(written).loras] == ["alpha", "zeta"]
    assert written.batch_key() == full_request(loras=(LoraWeight("alpha", 2.0), LoraWeight("zeta", 0.5))).batch_key()


def test_request_output_crosses_the_wire():
    images = [np.random.default_rng(0).integers(0, 256, (8, 4, 3), dtype=np.uint8) for _ in range(2)]
    output = RequestOutput(
        "req-1", images, (1, 2), rank=1, error=None,
        partial_images=[PartialImageOutput("req-1", 0, images[:1])],
        usage=Usage(3, 4, 5), stage_seconds={"denoise": 0.25},
    )
    back = output_from_proto(pb.RequestOutput.FromString(output_to_proto(output).SerializeToString()))
    assert (back.request_id, back.seed, back.rank, back.error, back.usage, back.stage_seconds) == (
        "req-1", (1, 2), 1, None, Usage(3, 4, 5), {"denoise": 0.25}
    )
    assert all(np.array_equal(a, b) for a, b in zip(back.images, images, strict=True))
    assert np.array_equal(back.partial_images[0].images[0], images[0])
    failed = output_from_proto(output_to_proto(RequestOutput("r", [], None, 0, "cancelled")))
    assert (failed.images, failed.seed, failed.error) == ([], None, "cancelled")


def test_encoded_images_cross_the_wire_as_the_worker_wrote_them():
    images = [EncodedImage(b"\x89PNG fake", "png", None, 4, 8), EncodedImage(b"RIFF fake", "webp", 40, 4, 8)]
    output = RequestOutput(
        "req-1", images, 7, rank=0, partial_images=[PartialImageOutput("req-1", 0, images[:1])],
        stage_seconds={"image_encode": 0.5},
    )
    message = output_to_proto(output)
    assert not message.images and len(message.encoded_images) == 2  # bytes, not pixels
    back = output_from_proto(pb.RequestOutput.FromString(message.SerializeToString()))
    assert back.images == images and back.partial_images[0].images == images[:1]
    assert back.stage_seconds == {"image_encode": 0.5}


def test_a_running_set_iteration_crosses_the_wire_with_its_finishing_requests():
    iteration = RunningSetIteration(rank=1, running=3, admitted=2, finishing=("a", "b"))
    message = pb.RunningSetIteration.FromString(running_set_iteration_to_proto(iteration).SerializeToString())
    assert running_set_iteration_from_proto(message) == iteration
    # A worker from before `finishing` sends none: the server frees room on replies alone.
    assert running_set_iteration_from_proto(pb.RunningSetIteration(rank=0, running=1, admitted=1)).finishing == ()


def test_a_worker_before_encoding_gets_requests_without_the_encode_fields():
    message = request_to_proto(full_request(loras=(), input_fidelity=None, images=()))
    assert (message.output_format, message.output_compression) == ("webp", 40)
    with pytest.raises(ContractVersionError, match=r"version 4, and this request needs version 5 .*'output_"):
        check_contract_version(message, ENCODING_SINCE - 1, "the worker at w")
    check_contract_version(without_encoding(message), 1, "the worker at w")
    assert request_from_proto(message).output_format == "png"  # what such a worker reads: unset is png
    # A png request (the default) sends no encode field at all.
    assert not request_to_proto(OmniDiffusionRequest("p", request_id="r")).HasField("output_format")


@pytest.mark.parametrize(
    "message",
    [
        pb.Pixels(shape=[2, 2, 3], data=b"\0" * 11),
        pb.Pixels(shape=[12], data=b"\0" * 12),
        pb.Pixels(shape=[1, 1, 1, 1], data=b"\0"),
    ],
)
def test_pixels_whose_shape_does_not_fit_are_refused(message):
    with pytest.raises(ValueError, match="cannot hold"):
        pixels_from_proto(message)


def test_a_request_without_id_or_images_is_refused():
    with pytest.raises(ValueError, match="request_id"):
        request_from_proto(pb.DiffusionRequest(prompt="p", num_images=1))
    with pytest.raises(ValueError, match="at least one image"):
        request_from_proto(pb.DiffusionRequest(request_id="r", prompt="p", num_images=0))


def test_rank_auto_takes_the_statefulset_ordinal():
    assert rank_from_hostname("imagegen-worker-3") == 3
    assert rank_from_hostname("imagegen-worker-b-12") == 12
    for hostname in ("laptop", "imagegen-worker-", "worker-x"):
        with pytest.raises(ValueError, match="pass --rank"):
            rank_from_hostname(hostname)


def test_worker_addresses_expand_rank_in_rank_order():
    pattern = "imagegen-worker-{rank}.imagegen-worker.default.svc.cluster.local:50051"
    assert expand_addresses([pattern], 2) == [
        "imagegen-worker-0.imagegen-worker.default.svc.cluster.local:50051",
        "imagegen-worker-1.imagegen-worker.default.svc.cluster.local:50051",
    ]
    assert expand_addresses(["a:1", "b:2"], 2) == ["a:1", "b:2"]
    with pytest.raises(WorkerStartupError, match="names 3 worker.* but --num-gpus is 2"):
        expand_addresses(["a:1", "b:2", "c:3"], 2)
    with pytest.raises(WorkerStartupError, match="--worker-addresses"):
        expand_addresses(None, 1)


def test_backend_grpc_and_its_settings(monkeypatch):
    assert get_executor_class("grpc") is GrpcExternalDiffusionExecutor
    monkeypatch.setenv("IMAGEGEN_WORKER_ADDRESSES", "10.0.0.1:50051, 10.0.0.2:50051")
    monkeypatch.setenv("IMAGEGEN_PORT", "9000")  # the HTTP server's port never moves a worker
    config = OmniDiffusionConfig()
    assert config.worker_addresses == ["10.0.0.1:50051", "10.0.0.2:50051"]
    assert (config.worker_host, config.worker_port, config.worker_rank) == ("127.0.0.1", 50051, 0)
    assert "worker_token" not in repr(OmniDiffusionConfig(worker_token="secret"))


def test_worker_flags_name_the_workers_own_address_and_rank():
    args = build_parser().parse_args(
        ["worker", "--host", "0.0.0.0", "--port", "6000", "--rank", "auto", "--health-port", "6001",
         "--allow-unauthenticated", "--tls-cert", "c.pem", "--tls-key", "k.pem", "--num-gpus", "4"]
    )
    flags = {name: value for name, value in vars(args).items() if name != "command"}
    config = OmniDiffusionConfig(**flags)
    assert (config.worker_host, config.worker_port, config.worker_rank, config.worker_health_port) == (
        "0.0.0.0", 6000, "auto", 6001
    )
    assert config.worker_allow_unauthenticated and config.num_gpus == 4
    assert (config.host, config.port) == ("127.0.0.1", 8000)
    # On serve, --host and --port stay the HTTP server's.
    serve = vars(build_parser().parse_args(["serve", "--host", "0.0.0.0", "--worker-port", "7000"]))
    assert (serve["host"], serve["worker_port"]) == ("0.0.0.0", 7000)


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"worker_host": "0.0.0.0"}, "without a worker token"),
        ({"worker_host": "10.1.2.3"}, "without a worker token"),
        ({"worker_tls_cert": "c.pem"}, "both --tls-cert and --tls-key"),
    ],
)
def test_unsafe_listen_settings_are_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        check_listen_settings(OmniDiffusionConfig(**settings))


@pytest.mark.parametrize(
    "settings",
    [{}, {"worker_host": "::1"}, {"worker_host": "0.0.0.0", "worker_token": "t"},
     {"worker_host": "0.0.0.0", "worker_allow_unauthenticated": True}],
)
def test_safe_listen_settings_pass(settings):
    check_listen_settings(OmniDiffusionConfig(**settings))


def test_worker_program_refuses_the_network_without_a_token_in_one_line():
    result = run_cli("worker", "--host", "0.0.0.0", env={"IMAGEGEN_WORKER_TOKEN": ""})
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "token" in result.stderr, result.stderr
