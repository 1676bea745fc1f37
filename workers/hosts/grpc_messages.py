"""The worker dataclasses as protobuf messages, both ways, for the gRPC worker and its executor.

Images travel to a worker as raw uint8 bytes with their shape; the receiving side wraps the bytes in a
read-only numpy array without copying them. They come back as the files the worker encoded them to
(EncodedImage, Generate with encode), or from an older worker as pixels. Decoding checks each message's
shape, so a malformed one is a ValueError, never a crash.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from workers.data import (
    EncodedImage,
    LoraWeight,
    OmniDiffusionRequest,
    PartialImageOutput,
    RequestOutput,
    RunningSetIteration,
    StepProgress,
    Usage,
    WorkerImage,
)
from workers.hosts.proto import worker_pb2 as pb

# Both ends raise gRPC's 4 MiB default to this, each way. A step of max_batch_size (8) edits at
# 1792x1024 sends 8 x 7.3 MB (image and mask) to a rank, 4 x 1024x1024 images come back as 12.6 MB;
# 1 GiB leaves room for large batches and sizes, and still refuses an absurd message.
MAX_MESSAGE_BYTES = 1 << 30
# Fields whose wire form is not the dataclass value itself.

# The worker contract's version, raised with every change to worker.proto that a worker must understand
# (the rule is in its header). 1: the contract before workers reported a version; 2: InitializeReply
# reports it, and a request runs with several LoRA adapters (loras); 3: an edit model's input_fidelity;
# 4: an edit model's several reference images (images); 5: the worker encodes its images (GenerateRequest.encode,
# a request's output_format and output_compression, EncodedImage).
CONTRACT_VERSION = 5
# DiffusionRequest fields added after version 1, each with the version that added it.
REQUEST_FIELDS_SINCE: dict[str, int] = {
    "loras": 2, "input_fidelity": 3, "images": 4, "output_format": 5, "output_compression": 5,
}
# The version from which a worker encodes its images: an older one gets requests without the encode fields
# (without_encoding) and sends pixels, which the server encodes.
ENCODING_SINCE = 5


class ContractVersionError(ValueError):
    """A request sets a field that the worker's contract version does not have."""


def worker_contract_version(reply: pb.InitializeReply) -> int:
    """The version a worker speaks, from its InitializeReply (a worker older than the field speaks 1)."""
    return reply.contract_version or 1


def check_contract_version(message: pb.DiffusionRequest, worker_version: int, worker: str) -> None:
    """Raise ContractVersionError when ``message`` sets a field newer than ``worker_version``: the worker
    would drop it without a word and make another image than the one asked for."""
    newer = {
        descriptor.name: REQUEST_FIELDS_SINCE[descriptor.name]
        for descriptor, _ in message.ListFields()
        if REQUEST_FIELDS_SINCE.get(descriptor.name, 1) > worker_version
    }
    if newer:
        field, version = max(newer.items(), key=lambda item: item[1])
        raise ContractVersionError(
            f"{worker} speaks worker contract version {worker_version}, and this request needs version {version} "
            f"for its field '{field}' (this server speaks {CONTRACT_VERSION}): upgrade the worker"
        )


def without_encoding(message: pb.DiffusionRequest) -> pb.DiffusionRequest:
    """``message`` for a worker older than ENCODING_SINCE: the encode fields only say how to write the images,
    which the server then does itself, so they are dropped, not refused."""
    message.ClearField("output_format")
    message.ClearField("output_compression")
    return message


def pixels_to_proto(array: np.ndarray) -> pb.Pixels:
    return pb.Pixels(shape=array.shape, data=np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def pixels_from_proto(message: pb.Pixels) -> np.ndarray:
    shape = tuple(message.shape)
    if len(shape) not in (2, 3) or math.prod(shape) != len(message.data):
        raise ValueError(f"pixels of shape {shape} cannot hold {len(message.data)} bytes")
    return np.frombuffer(message.data, dtype=np.uint8).reshape(shape)


def encoded_to_proto(image: EncodedImage) -> pb.EncodedImage:
    return pb.EncodedImage(
        data=image.data, format=image.format, compression=image.compression, width=image.width, height=image.height
    )


def encoded_from_proto(message: pb.EncodedImage) -> EncodedImage:
    compression = message.compression if message.HasField("compression") else None
    return EncodedImage(message.data, message.format, compression, message.width, message.height)


def images_to_proto(images: list[WorkerImage]) -> dict:
    """A reply's images as the fields that carry them: pixels in ``images``, files in ``encoded_images``."""
    return {
        "images": [pixels_to_proto(image) for image in images if not isinstance(image, EncodedImage)],
        "encoded_images": [encoded_to_proto(image) for image in images if isinstance(image, EncodedImage)],
    }


def images_from_proto(message: pb.RequestOutput | pb.PartialImage) -> list[WorkerImage]:
    """A reply's images: its pixels, or (a worker that encoded them) its files."""
    return [pixels_from_proto(image) for image in message.images] + [
        encoded_from_proto(image) for image in message.encoded_images
    ]


def seed_to_proto(seed: int | tuple[int, ...] | None) -> pb.Seed | None:
    if seed is None:
        return None
    if isinstance(seed, tuple):
        return pb.Seed(values=seed, per_image=True)
    return pb.Seed(values=[seed])


def seed_from_proto(message: pb.Seed) -> int | tuple[int, ...]:
    if message.per_image:
        return tuple(message.values)
    if len(message.values) != 1:
        raise ValueError(f"a single seed has one value, got {len(message.values)}")
    return message.values[0]


def request_to_proto(request: OmniDiffusionRequest) -> pb.DiffusionRequest:
    message = pb.DiffusionRequest()
    for field in dataclasses.fields(request):
        value = getattr(request, field.name)
        if value is None or (field.name == "output_format" and value == "png"):
            continue  # an unset optional field (or message) is None on the other side; an unset output_format, png
        if field.name == "mask":
            message.mask.CopyFrom(pixels_to_proto(value))
        elif field.name == "images" and len(value) == 1:  # the one-image form, which every worker reads
            message.image.CopyFrom(pixels_to_proto(value[0]))
        elif field.name == "images":
            message.images.extend(pixels_to_proto(image) for image in value)
        elif field.name == "seed":
            message.seed.CopyFrom(seed_to_proto(value))
        elif field.name == "loras" and len(value) == 1:  # the one-adapter form, which every worker reads
            message.lora_name = value[0].name
            if value[0].scale is not None:
                message.lora_scale = value[0].scale
        elif field.name == "loras":
            message.loras.extend(pb.LoraWeight(name=lora.name, scale=lora.scale) for lora in value)
        else:
            setattr(message, field.name, value)
    return message


def request_from_proto(message: pb.DiffusionRequest) -> OmniDiffusionRequest:
    values = {}
    for field in dataclasses.fields(OmniDiffusionRequest):
        descriptor = message.DESCRIPTOR.fields_by_name[field.name]
        if field.name == "output_format" and not message.HasField("output_format"):
            values[field.name] = "png"  # unset: from a sender before version 5, or png
        elif descriptor.has_presence and not message.HasField(field.name):
            values[field.name] = None
        elif field.name == "mask":
            values[field.name] = pixels_from_proto(message.mask)
        elif field.name == "images":
            # Several in ``images``; one (from any sender) in ``image``.
            images = message.images or ([message.image] if message.HasField("image") else [])
            values[field.name] = tuple(pixels_from_proto(image) for image in images)
        elif field.name == "seed":
            values[field.name] = seed_from_proto(message.seed)
        elif field.name == "loras":
            values[field.name] = loras_from_proto(message)
        else:
            values[field.name] = getattr(message, field.name)
    if not values["request_id"] or values["num_images"] < 1:
        raise ValueError("a request needs a request_id and at least one image")
    return OmniDiffusionRequest(**values)


def loras_from_proto(message: pb.DiffusionRequest) -> tuple[LoraWeight, ...]:
    """A request's adapters: ``loras``, or from a sender before it, the one-adapter ``lora_name``."""
    if not message.loras and message.HasField("lora_name"):
        return (LoraWeight(message.lora_name, message.lora_scale if message.HasField("lora_scale") else None),)
    return tuple(
        LoraWeight(lora.name, lora.scale if lora.HasField("scale") else None) for lora in message.loras
    )


def partial_to_proto(partial: PartialImageOutput) -> pb.PartialImage:
    return pb.PartialImage(request_id=partial.request_id, index=partial.index, **images_to_proto(partial.images))


def partial_from_proto(message: pb.PartialImage) -> PartialImageOutput:
    return PartialImageOutput(message.request_id, message.index, images_from_proto(message))


def step_progress_to_proto(progress: StepProgress) -> pb.StepProgress:
    return pb.StepProgress(request_id=progress.request_id, step=progress.step, total_steps=progress.total_steps)


def step_progress_from_proto(message: pb.StepProgress) -> StepProgress:
    return StepProgress(message.request_id, message.step, message.total_steps)


def running_set_iteration_to_proto(iteration: RunningSetIteration) -> pb.RunningSetIteration:
    return pb.RunningSetIteration(
        rank=iteration.rank, running=iteration.running, admitted=iteration.admitted, finishing=iteration.finishing
    )


def running_set_iteration_from_proto(message: pb.RunningSetIteration) -> RunningSetIteration:
    return RunningSetIteration(message.rank, message.running, message.admitted, tuple(message.finishing))


def output_to_proto(output: RequestOutput) -> pb.RequestOutput:
    return pb.RequestOutput(
        request_id=output.request_id,
        **images_to_proto(output.images),
        seed=seed_to_proto(output.seed),
        rank=output.rank,
        error=output.error,
        partial_images=[partial_to_proto(partial) for partial in output.partial_images],
        usage=pb.Usage(**dataclasses.asdict(output.usage)),
        stage_seconds=output.stage_seconds,
    )


def output_from_proto(message: pb.RequestOutput) -> RequestOutput:
    return RequestOutput(
        request_id=message.request_id,
        images=images_from_proto(message),
        seed=seed_from_proto(message.seed) if message.HasField("seed") else None,
        rank=message.rank,
        error=message.error if message.HasField("error") else None,
        partial_images=[partial_from_proto(partial) for partial in message.partial_images],
        usage=Usage(message.usage.text_tokens, message.usage.input_image_tokens, message.usage.output_image_tokens),
        stage_seconds=dict(message.stage_seconds),
    )
