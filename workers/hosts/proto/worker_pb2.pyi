from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Pixels(_message.Message):
    __slots__ = ("shape", "data")
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class Seed(_message.Message):
    __slots__ = ("values", "per_image")
    VALUES_FIELD_NUMBER: _ClassVar[int]
    PER_IMAGE_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[int]
    per_image: bool
    def __init__(self, values: _Optional[_Iterable[int]] = ..., per_image: _Optional[bool] = ...) -> None: ...

class DiffusionRequest(_message.Message):
    __slots__ = ("request_id", "prompt", "height", "width", "negative_prompt", "num_inference_steps", "guidance_scale", "seed", "num_images", "image", "mask", "strength", "partial_images", "progress", "cache", "lora_name", "lora_scale", "loras", "input_fidelity", "images", "output_format", "output_compression")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_PROMPT_FIELD_NUMBER: _ClassVar[int]
    NUM_INFERENCE_STEPS_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_SCALE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    NUM_IMAGES_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    MASK_FIELD_NUMBER: _ClassVar[int]
    STRENGTH_FIELD_NUMBER: _ClassVar[int]
    PARTIAL_IMAGES_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    CACHE_FIELD_NUMBER: _ClassVar[int]
    LORA_NAME_FIELD_NUMBER: _ClassVar[int]
    LORA_SCALE_FIELD_NUMBER: _ClassVar[int]
    LORAS_FIELD_NUMBER: _ClassVar[int]
    INPUT_FIDELITY_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FORMAT_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_COMPRESSION_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prompt: str
    height: int
    width: int
    negative_prompt: str
    num_inference_steps: int
    guidance_scale: float
    seed: Seed
    num_images: int
    image: Pixels
    mask: Pixels
    strength: float
    partial_images: int
    progress: bool
    cache: bool
    lora_name: str
    lora_scale: float
    loras: _containers.RepeatedCompositeFieldContainer[LoraWeight]
    input_fidelity: str
    images: _containers.RepeatedCompositeFieldContainer[Pixels]
    output_format: str
    output_compression: int
    def __init__(self, request_id: _Optional[str] = ..., prompt: _Optional[str] = ..., height: _Optional[int] = ..., width: _Optional[int] = ..., negative_prompt: _Optional[str] = ..., num_inference_steps: _Optional[int] = ..., guidance_scale: _Optional[float] = ..., seed: _Optional[_Union[Seed, _Mapping]] = ..., num_images: _Optional[int] = ..., image: _Optional[_Union[Pixels, _Mapping]] = ..., mask: _Optional[_Union[Pixels, _Mapping]] = ..., strength: _Optional[float] = ..., partial_images: _Optional[int] = ..., progress: _Optional[bool] = ..., cache: _Optional[bool] = ..., lora_name: _Optional[str] = ..., lora_scale: _Optional[float] = ..., loras: _Optional[_Iterable[_Union[LoraWeight, _Mapping]]] = ..., input_fidelity: _Optional[str] = ..., images: _Optional[_Iterable[_Union[Pixels, _Mapping]]] = ..., output_format: _Optional[str] = ..., output_compression: _Optional[int] = ...) -> None: ...

class EncodedImage(_message.Message):
    __slots__ = ("data", "format", "compression", "width", "height")
    DATA_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    COMPRESSION_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    format: str
    compression: int
    width: int
    height: int
    def __init__(self, data: _Optional[bytes] = ..., format: _Optional[str] = ..., compression: _Optional[int] = ..., width: _Optional[int] = ..., height: _Optional[int] = ...) -> None: ...

class LoraWeight(_message.Message):
    __slots__ = ("name", "scale")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    name: str
    scale: float
    def __init__(self, name: _Optional[str] = ..., scale: _Optional[float] = ...) -> None: ...

class Usage(_message.Message):
    __slots__ = ("text_tokens", "input_image_tokens", "output_image_tokens")
    TEXT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    INPUT_IMAGE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_IMAGE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    text_tokens: int
    input_image_tokens: int
    output_image_tokens: int
    def __init__(self, text_tokens: _Optional[int] = ..., input_image_tokens: _Optional[int] = ..., output_image_tokens: _Optional[int] = ...) -> None: ...

class PartialImage(_message.Message):
    __slots__ = ("request_id", "index", "images", "encoded_images")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    ENCODED_IMAGES_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    index: int
    images: _containers.RepeatedCompositeFieldContainer[Pixels]
    encoded_images: _containers.RepeatedCompositeFieldContainer[EncodedImage]
    def __init__(self, request_id: _Optional[str] = ..., index: _Optional[int] = ..., images: _Optional[_Iterable[_Union[Pixels, _Mapping]]] = ..., encoded_images: _Optional[_Iterable[_Union[EncodedImage, _Mapping]]] = ...) -> None: ...

class StepProgress(_message.Message):
    __slots__ = ("request_id", "step", "total_steps")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    step: int
    total_steps: int
    def __init__(self, request_id: _Optional[str] = ..., step: _Optional[int] = ..., total_steps: _Optional[int] = ...) -> None: ...

class RunningSetIteration(_message.Message):
    __slots__ = ("rank", "running", "admitted", "finishing")
    RANK_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    ADMITTED_FIELD_NUMBER: _ClassVar[int]
    FINISHING_FIELD_NUMBER: _ClassVar[int]
    rank: int
    running: int
    admitted: int
    finishing: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, rank: _Optional[int] = ..., running: _Optional[int] = ..., admitted: _Optional[int] = ..., finishing: _Optional[_Iterable[str]] = ...) -> None: ...

class RequestOutput(_message.Message):
    __slots__ = ("request_id", "images", "seed", "rank", "error", "partial_images", "usage", "stage_seconds", "encoded_images")
    class StageSecondsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    PARTIAL_IMAGES_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    STAGE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ENCODED_IMAGES_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    images: _containers.RepeatedCompositeFieldContainer[Pixels]
    seed: Seed
    rank: int
    error: str
    partial_images: _containers.RepeatedCompositeFieldContainer[PartialImage]
    usage: Usage
    stage_seconds: _containers.ScalarMap[str, float]
    encoded_images: _containers.RepeatedCompositeFieldContainer[EncodedImage]
    def __init__(self, request_id: _Optional[str] = ..., images: _Optional[_Iterable[_Union[Pixels, _Mapping]]] = ..., seed: _Optional[_Union[Seed, _Mapping]] = ..., rank: _Optional[int] = ..., error: _Optional[str] = ..., partial_images: _Optional[_Iterable[_Union[PartialImage, _Mapping]]] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ..., stage_seconds: _Optional[_Mapping[str, float]] = ..., encoded_images: _Optional[_Iterable[_Union[EncodedImage, _Mapping]]] = ...) -> None: ...

class InitializeRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class InitializeReply(_message.Message):
    __slots__ = ("num_ranks", "model_name", "description_json", "contract_version")
    NUM_RANKS_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_JSON_FIELD_NUMBER: _ClassVar[int]
    CONTRACT_VERSION_FIELD_NUMBER: _ClassVar[int]
    num_ranks: int
    model_name: str
    description_json: str
    contract_version: int
    def __init__(self, num_ranks: _Optional[int] = ..., model_name: _Optional[str] = ..., description_json: _Optional[str] = ..., contract_version: _Optional[int] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("requests", "encode")
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    ENCODE_FIELD_NUMBER: _ClassVar[int]
    requests: _containers.RepeatedCompositeFieldContainer[DiffusionRequest]
    encode: bool
    def __init__(self, requests: _Optional[_Iterable[_Union[DiffusionRequest, _Mapping]]] = ..., encode: _Optional[bool] = ...) -> None: ...

class GenerateEvent(_message.Message):
    __slots__ = ("partial_image", "reply", "step_progress", "running_set_iteration")
    PARTIAL_IMAGE_FIELD_NUMBER: _ClassVar[int]
    REPLY_FIELD_NUMBER: _ClassVar[int]
    STEP_PROGRESS_FIELD_NUMBER: _ClassVar[int]
    RUNNING_SET_ITERATION_FIELD_NUMBER: _ClassVar[int]
    partial_image: PartialImage
    reply: GenerateReply
    step_progress: StepProgress
    running_set_iteration: RunningSetIteration
    def __init__(self, partial_image: _Optional[_Union[PartialImage, _Mapping]] = ..., reply: _Optional[_Union[GenerateReply, _Mapping]] = ..., step_progress: _Optional[_Union[StepProgress, _Mapping]] = ..., running_set_iteration: _Optional[_Union[RunningSetIteration, _Mapping]] = ...) -> None: ...

class GenerateReply(_message.Message):
    __slots__ = ("outputs",)
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    outputs: _containers.RepeatedCompositeFieldContainer[RequestOutput]
    def __init__(self, outputs: _Optional[_Iterable[_Union[RequestOutput, _Mapping]]] = ...) -> None: ...

class CancelRequest(_message.Message):
    __slots__ = ("request_ids",)
    REQUEST_IDS_FIELD_NUMBER: _ClassVar[int]
    request_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, request_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class CancelReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetRankRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetRankReply(_message.Message):
    __slots__ = ("rank",)
    RANK_FIELD_NUMBER: _ClassVar[int]
    rank: int
    def __init__(self, rank: _Optional[int] = ...) -> None: ...

class ExecuteRpcRequest(_message.Message):
    __slots__ = ("method", "args_json", "kwargs_json")
    METHOD_FIELD_NUMBER: _ClassVar[int]
    ARGS_JSON_FIELD_NUMBER: _ClassVar[int]
    KWARGS_JSON_FIELD_NUMBER: _ClassVar[int]
    method: str
    args_json: str
    kwargs_json: str
    def __init__(self, method: _Optional[str] = ..., args_json: _Optional[str] = ..., kwargs_json: _Optional[str] = ...) -> None: ...

class ExecuteRpcReply(_message.Message):
    __slots__ = ("result_json",)
    RESULT_JSON_FIELD_NUMBER: _ClassVar[int]
    result_json: str
    def __init__(self, result_json: _Optional[str] = ...) -> None: ...

class ShutdownRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ShutdownReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
