"""The one settings object. Every layer reads it, so it lives at the bottom of the import graph."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

# Beside model_index.json, a model folder may say which defaults suit it (docs/models.md).
MODEL_DEFAULTS_FILE = "imagegen.json"


def default_cache_dir() -> Path:
    """Where built-in models are written: $XDG_CACHE_HOME/imagegen/models."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "imagegen" / "models"


DEFAULT_ALLOWED_SIZES = (
    "64x64",
    "128x128",
    "256x256",
    "512x512",
    "768x768",
    "1024x1024",
    "1024x1536",
    "1536x1024",
    "1024x1792",
    "1792x1024",
)


def parse_size(size: str) -> tuple[int, int]:
    """'WxH' -> (width, height); ValueError for anything else."""
    width, sep, height = size.lower().partition("x")
    if not sep or not width.isdigit() or not height.isdigit():
        raise ValueError(f"size must look like '512x512', got {size!r}")
    return int(width), int(height)


@dataclass(frozen=True)
class LoraModule:
    """A LoRA adapter: the model id requests pick it by, its weights (a folder or a file, on the workers'
    host), and the scale a request that names none runs it at."""

    name: str
    path: str
    scale: float = 1.0


# Adapter names are model ids in URLs (/v1/models/{id}) and metric labels: kept to a plain alphabet.
_LORA_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def check_lora_name(name: str) -> str:
    """``name`` when it can be a LoRA adapter's model id; ValueError saying why not otherwise."""
    if not _LORA_NAME.fullmatch(name):
        raise ValueError(
            f"LoRA adapter name {name!r} must be 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return name


def parse_lora_module(spec: str) -> LoraModule:
    """'name=path' or 'name=path:scale' -> LoraModule; ValueError for anything else."""
    name, sep, rest = spec.partition("=")
    if not sep or not rest:
        raise ValueError(f"a LoRA module looks like name=path or name=path:scale, got {spec!r}")
    check_lora_name(name)
    path, colon, scale = rest.rpartition(":")
    if colon and path:
        try:
            return LoraModule(name, path, float(scale))
        except ValueError:
            pass  # the colon is part of the path
    return LoraModule(name, rest)


class OmniDiffusionConfig(BaseSettings):
    """Settings for the server, the engine, the executor and the workers.

    Read from keyword arguments, then ``IMAGEGEN_*`` environment variables, then defaults.
    ``imagegen serve`` exposes every field as a flag of the same name (``--max-batch-size``), and so
    does ``imagegen worker``, where ``--host`` and ``--port`` are the worker's own (worker_host, worker_port).
    """

    model_config = SettingsConfigDict(
        env_prefix="IMAGEGEN_",
        protected_namespaces=(),
        validate_assignment=True,
        arbitrary_types_allowed=True,
    )

    model: str = Field(
        "demo",
        description="built-in model (demo, tiny, tiny-flux, tiny-sd3, tiny-kontext, tiny-flux2-klein; random-sd15, "
        "random-sdxl, random-flux-dev: full-size architectures with random weights), a diffusers folder, or a cached "
        "hub id; serve takes several (space-separated; comma-separated in IMAGEGEN_MODEL), see docs/models.md",
        json_schema_extra={"cli_nargs": "+"},
    )
    served_model_name: str | None = Field(None, description="model id clients send and /v1/models lists (default: --model)")
    model_cache_dir: Path = Field(default_factory=default_cache_dir, description="where built-in models are written")
    num_gpus: int = Field(1, ge=1, description="number of workers (ranks); each owns one device")
    # NoDecode: "2,3" from the environment is split below, as from the command line.
    device_ids: Annotated[list[int] | None, NoDecode] = Field(
        None, description="the CUDA devices of the ranks, in rank order (default: rank r on cuda:r)"
    )
    # -- several models per server; see docs/models.md -------------------------------------------
    models_file: Path | None = Field(
        None, description="YAML list of models to serve, each entry overriding the server-wide settings (serve only)"
    )
    max_loaded_models: int | None = Field(
        None, ge=1, description="most models loaded at once; the least recently used idle one makes room"
    )
    memory_budget_gib: float | None = Field(
        None, gt=0, description="most memory the loaded models may take on each device, as their workers measure it"
    )
    model_keep_alive_s: float = Field(
        -1, ge=-1, description="unload a model after this many seconds without requests (-1: never); keep_alive_s "
        "in a models-file entry"
    )
    preload: bool | None = Field(
        None, description="load at start-up rather than on the first request (default: the first model only)"
    )
    # -- rank groups (several devices on one image); see docs/parallelism.md ----------------------
    cfg_parallel_size: int = Field(
        1,
        ge=1,
        le=2,
        description="ranks that share each denoiser call of classifier-free guidance: 2 runs the conditional "
        "and the unconditional half on two ranks (SD, SDXL, SD3, PixArt and the like)",
    )
    ulysses_degree: int = Field(
        1, ge=1, description="ranks that split a DiT's sequence by attention heads (Ulysses; diffusers' context parallel)"
    )
    ring_degree: int = Field(
        1, ge=1, description="ranks that split a DiT's sequence into a ring of key/value blocks (ring attention)"
    )
    rank_group_address: str | None = Field(
        None,
        description="host:port where each rank group meets (torch.distributed rendezvous), {leader} standing for "
        "the group's first rank; backends mp and ray pick one themselves, grpc and ray_external workers need it",
    )
    distributed_executor_backend: str | type = Field(
        "mp",
        description="executor backend: mp, ray, ray_external, grpc, external_launcher, or package.module:Class",
        json_schema_extra={"cli_aliases": ["--backend"]},
    )
    device: Literal["auto", "cuda", "cpu"] = Field("auto", description="auto picks cuda when available")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="auto is bfloat16 on cuda and float32 on cpu"
    )
    max_batch_size: int = Field(8, ge=1, description="most images one worker generates in one step")
    batch_timeout_ms: float = Field(
        0.0,
        ge=0,
        description="how long a step waits to fill its batch while the workers are idle; 0: it leaves at once (a lone "
        "request waits for nobody; requests that arrive while a step runs still fill the next)",
    )
    scheduling: Literal["request", "step"] = Field(
        "step",
        description="step: requests join and leave a worker's running set at every denoising step (SD and Flux "
        "text-to-image; the rest runs as request); request: a step is whole generations",
    )
    rpc_timeout_s: float = Field(300.0, gt=0, description="longest a worker may take for one call")
    worker_start_timeout_s: float = Field(600.0, gt=0, description="longest a worker may take to load its model")
    default_size: str | None = Field(
        None, description="size when a request names none (default: the model's native size, which imagegen.json may set)"
    )
    default_num_inference_steps: int | None = Field(
        None, ge=1, description="denoising steps when a request names none (default: the model folder's imagegen.json, else 20)"
    )
    default_guidance_scale: float | None = Field(
        None, description="guidance when a request names none (default: the model folder's imagegen.json, else the pipeline's)"
    )
    max_num_inference_steps: int = Field(150, ge=1, description="largest num_inference_steps a request may ask for")
    # NoDecode: the environment gives "64x64,128x128", split below, not JSON.
    allowed_sizes: Annotated[list[str], NoDecode] = Field(list(DEFAULT_ALLOWED_SIZES), description="sizes a request may ask for (WxH, multiples of 8)")
    max_output_pixels: int = Field(
        1792 * 1024,
        ge=64 * 64,
        description="sizes outside allowed_sizes are accepted up to this many pixels, as multiples of the model's size multiple",
    )
    host: str = Field("127.0.0.1", description="address the HTTP server binds")
    port: int = Field(8000, ge=0, le=65535, description="port the HTTP server binds")
    log_format: Literal["text", "json"] = Field("text", description="log lines as text, or one JSON object each")
    # -- faults and overload; see docs/reliability.md ------------------------------------------
    on_worker_death: Literal["restart", "exit"] = Field(
        "restart", description="restart a dead or hung worker, or exit non-zero so an orchestrator restarts us"
    )
    health_check_interval_s: float = Field(
        5.0,
        gt=0,
        description="how often a background probe checks every rank group; a set-aside group that answers again "
        "is initialized again and re-admitted",
    )
    max_queue_size: int = Field(256, ge=1, description="most images waiting for a step; more are refused with 429")
    max_queued_images_per_key: int | None = Field(
        None,
        ge=1,
        description="most images one key (API key, --fairness-header value or client address) may have waiting; "
        "its requests past it are refused with 429 while other keys still get in; a key with nothing waiting "
        "may always queue one request (default: a quarter of max_queue_size)",
    )
    fairness_header: str | None = Field(
        None,
        description="request header that names whom a request counts for in the fair queue and the per-key cap, "
        "e.g. X-Forwarded-User; trusts the proxy that sets it (default: the API key, else the client address)",
    )
    request_timeout_s: float = Field(600.0, gt=0, description="a request still queued after this is answered 504")
    shutdown_timeout_s: float = Field(30.0, ge=0, description="on SIGTERM, how long in-flight requests may finish")
    max_request_body_bytes: int = Field(50 * 1024 * 1024, ge=1024, description="larger request bodies get 413")
    max_prompt_length: int = Field(32000, ge=1, description="longest prompt, in characters")
    # -- Ray backends (ray, ray_external); see docs/executors.md ---------------------------------
    ray_address: str | None = Field(
        None,
        description="Ray cluster to join: host:port, 'auto' or ray://host:port (default: RAY_ADDRESS; "
        "backend ray starts a private local Ray when neither is set)",
    )
    ray_namespace: str | None = Field(
        None, description="Ray namespace of the worker actors (default: the Ray driver's own namespace)"
    )
    # NoDecode: "a,b" from the environment is split below, as from the command line.
    worker_actor_names: Annotated[list[str] | None, NoDecode] = Field(
        None,
        description="Ray actor names of the workers, in rank order, for backend ray_external "
        "(default: DIFFUSION_WORKER_ACTOR_NAMES)",
    )
    ray_cpus_per_worker: float = Field(
        1.0, gt=0, description="CPUs each worker actor of backend ray reserves when the cluster has no GPU"
    )
    ray_placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="how backend ray places its one-bundle-per-rank placement group on the nodes"
    )
    # NoDecode: the JSON is parsed below, the same way from flags, keywords and the environment.
    ray_rank_resources: Annotated[list[dict[str, float]] | None, NoDecode] = Field(
        None,
        description='extra Ray resources per rank for backend ray, as JSON: [{"node_a": 1}, {"node_b": 1}] '
        "pins rank 0 and rank 1 to the nodes that offer them",
    )
    # -- gRPC workers (`imagegen worker`, backend grpc); see docs/executors.md ------------------
    # NoDecode: "a:1,b:2" from the environment is split below, as from the command line.
    worker_addresses: Annotated[list[str] | None, NoDecode] = Field(
        None,
        description="gRPC addresses (host:port) of the workers, in rank order, for backend grpc; an entry holding "
        "{rank} stands for one address per rank in range(num_gpus)",
    )
    # On `imagegen worker`, --host and --port name these two (the HTTP server's host and port are not its).
    worker_host: str = Field(
        "127.0.0.1",
        description="address imagegen worker listens on",
        json_schema_extra={"worker_cli_aliases": ["--host"]},
    )
    worker_port: int = Field(
        50051,
        ge=0,
        le=65535,
        description="port imagegen worker listens on",
        json_schema_extra={"worker_cli_aliases": ["--port"]},
    )
    worker_rank: Annotated[int, Field(ge=0)] | Literal["auto"] = Field(
        0,
        description="rank of imagegen worker, or auto: the ordinal that ends a StatefulSet pod's hostname "
        "(imagegen-worker-3 is rank 3)",
        json_schema_extra={"worker_cli_aliases": ["--rank"]},
    )
    worker_health_port: int | None = Field(
        None,
        ge=1,
        le=65535,
        description="a plaintext port on which imagegen worker serves only the gRPC health service "
        "(for the kubelet's grpc probe when TLS is on)",
        json_schema_extra={"worker_cli_aliases": ["--health-port"]},
    )
    # repr=False: the token never reaches logs.
    worker_token: str | None = Field(
        None,
        repr=False,
        description="token that imagegen worker requires on every call but health checks, and that backend grpc "
        "sends; compared in constant time. Prefer IMAGEGEN_WORKER_TOKEN to the flag, which other users can see in ps",
    )
    worker_allow_unauthenticated: bool = Field(
        False,
        description="let imagegen worker listen beyond loopback without a token",
        json_schema_extra={"worker_cli_aliases": ["--allow-unauthenticated"]},
    )
    worker_tls_cert: Path | None = Field(
        None,
        description="PEM certificate that imagegen worker serves TLS with",
        json_schema_extra={"worker_cli_aliases": ["--tls-cert"]},
    )
    worker_tls_key: Path | None = Field(
        None,
        description="PEM private key of the worker's certificate",
        json_schema_extra={"worker_cli_aliases": ["--tls-key"]},
    )
    worker_tls_ca: Path | None = Field(
        None, description="PEM CA certificate that backend grpc checks its workers' certificates with (turns TLS on)"
    )
    # -- OpenAI API; see docs/openai-compatibility.md ---------------------------------------------
    # NoDecode: "key1,key2" from the environment is split below. repr=False: keys never reach logs.
    api_key: Annotated[list[str] | None, NoDecode] = Field(
        None,
        repr=False,
        description="API keys accepted as 'Authorization: Bearer <key>' on /v1/* (comma-separated; "
        "default: no auth). Prefer IMAGEGEN_API_KEY to the flag, which other users can see in ps",
    )
    metrics_require_api_key: bool = Field(False, description="whether /metrics needs an API key too")
    default_response_format: Literal["b64_json", "url"] = Field(
        "b64_json", description="answer when a request names no response_format (url: like DALL-E)"
    )
    public_base_url: str | None = Field(
        None, description="base of image URLs, e.g. https://proxy.example/imagegen (default: the request's own)"
    )
    image_storage_dir: Path | None = Field(
        None, description="where url images are stored (default: a private temporary folder, removed at exit)"
    )
    image_ttl_s: float = Field(3600.0, gt=0, description="how long a url image can be fetched")
    max_upload_image_bytes: int = Field(25 * 1024 * 1024, ge=1, description="largest uploaded image file, in bytes")
    max_upload_image_pixels: int = Field(
        4096 * 4096, ge=1, description="most pixels an uploaded image may decode to (larger ones get 400)"
    )
    inpaint_keep_unmasked: bool = Field(
        True,
        description="after inpainting, paste the input's own pixels back outside the mask (feathered a few pixels, "
        "so the seam does not show); false keeps what the pipeline decoded everywhere",
    )
    # -- speed levers; see docs/benchmarks.md ("Speed levers") --------------------------------------
    cache_method: Literal["none", "first-block", "taylorseer", "faster", "pab"] = Field(
        "none",
        description="step cache on the denoiser (diffusers hooks): none, first-block, taylorseer, faster, pab; "
        "a request sends cache=false to go without it",
    )
    # NoDecode: the JSON is parsed below, the same way from flags, keywords and the environment.
    cache_options: Annotated[dict[str, Any], NoDecode] = Field(
        default_factory=dict,
        description='parameters of the cache method as a JSON object, e.g. {"cache_interval": 4} for taylorseer',
    )
    compile: Literal["none", "regional", "full"] = Field(
        "none",
        description="torch.compile the denoiser's repeated blocks (regional) or all of it (full), "
        "warmed up before /ready",
    )
    # NoDecode: "512x512,1024x1024" from the environment is split below, as from the command line.
    compile_warmup_sizes: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="sizes compiled before /ready besides the default size (WxH, comma-separated)"
    )
    attention_backend: str | None = Field(
        None,
        description="diffusers attention backend of the denoiser: native, flash, sage, ... (default: diffusers' own)",
    )
    offload: Literal["none", "model", "sequential"] = Field(
        "none", description="keep weights on the CPU and move each model (or each layer) to the GPU when it runs"
    )
    vae_tiling: bool = Field(
        False, description="decode large images tile by tile (less memory, slightly different pixels)"
    )
    vae_slicing: bool = Field(False, description="decode a batch one image at a time (less memory)")
    # -- quantized weights; see docs/quantization.md ------------------------------------------------
    quantization: Literal["none", "int8wo", "int8dq", "float8wo", "float8dq", "nf4", "int8"] = Field(
        "none",
        description="quantize weights at load time: torchao int8wo, int8dq, float8wo (CPU and CUDA), float8dq "
        "(CUDA compute capability 8.9+); bitsandbytes nf4, int8 (CUDA)",
    )
    # NoDecode: "transformer,text_encoder_2" from the environment is split below, as from the command line.
    quantize_components: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="pipeline components --quantization applies to, comma-separated (default: the denoiser and "
        "the T5/UMT5 text encoders)",
    )
    denoiser_file: Path | None = Field(
        None,
        description="load the denoiser (transformer or UNet) of --model from this .gguf or .safetensors file, "
        "with the model folder's config; nothing is fetched",
    )
    # -- LoRA adapters; see docs/lora.md -------------------------------------------------------------
    # NoDecode: "a=/x,b=/y" from the environment is split below; the flag takes them space-separated.
    lora_modules: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="LoRA adapters loaded at start-up, as name=path or name=path:scale (a diffusers/PEFT folder "
        "or a .safetensors file, kohya keys too); a request picks one with model=name",
        json_schema_extra={"cli_nargs": "+"},
    )
    max_loras_per_request: int = Field(
        4, ge=1, description="most LoRA adapters one request may name in loras (more are refused with 400)"
    )
    allow_runtime_lora: bool = Field(
        False, description="serve POST /v1/load_lora_adapter and /v1/unload_lora_adapter (needs --admin-api-key)"
    )
    # repr=False: the key never reaches logs.
    admin_api_key: str | None = Field(
        None,
        repr=False,
        description="key ('Authorization: Bearer <key>') the LoRA and model load and unload routes require, compared "
        "in constant time. Prefer IMAGEGEN_ADMIN_API_KEY to the flag, which other users can see in ps",
    )
    lora_dir: Path | None = Field(
        None,
        description="folder every LoRA path must lie in (checked on the workers' host); relative paths are "
        "taken from it (default: any path)",
    )

    @field_validator(
        "allowed_sizes", "worker_actor_names", "worker_addresses", "api_key", "compile_warmup_sizes", "lora_modules",
        "quantize_components", mode="before",
    )
    @classmethod
    def _split_comma_lists(cls, value: Any, info: ValidationInfo) -> Any:
        """The environment and the flags give these lists as "a,b,c"."""
        if not isinstance(value, str):
            return value
        items = [item.strip() for item in value.split(",") if item.strip()]
        # No actor names, addresses or keys means the setting is unset; an empty size list stays a list.
        return items if items or info.field_name in (
            "allowed_sizes", "compile_warmup_sizes", "lora_modules", "quantize_components"
        ) else None

    @field_validator("device_ids", mode="before")
    @classmethod
    def _split_device_ids(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [int(item) for item in value.split(",") if item.strip()] or None
        return value

    @field_validator("model", mode="before")
    @classmethod
    def _join_models(cls, value: Any) -> Any:
        """``--model a b`` arrives as a list; kept as "a,b", the form IMAGEGEN_MODEL takes."""
        if isinstance(value, list):
            return ",".join(str(item) for item in value)
        return value

    @field_validator("ray_rank_resources", mode="before")
    @classmethod
    def _parse_rank_resources(cls, value: Any) -> Any:
        if isinstance(value, str):
            try:
                return json.loads(value) if value.strip() else None
            except json.JSONDecodeError as error:
                raise ValueError(f'must be JSON like [{{"node_a": 1}}, {{"node_b": 1}}]: {error}') from error
        return value

    @field_validator("cache_options", mode="before")
    @classmethod
    def _parse_cache_options(cls, value: Any) -> Any:
        if isinstance(value, str):
            try:
                value = json.loads(value) if value.strip() else {}
            except json.JSONDecodeError as error:
                raise ValueError(f'must be a JSON object like {{"cache_interval": 4}}: {error}') from error
            if not isinstance(value, dict):
                raise ValueError(f'must be a JSON object like {{"cache_interval": 4}}, got {type(value).__name__}')
        return value

    @field_validator("compile_warmup_sizes")
    @classmethod
    def _check_warmup_sizes(cls, sizes: list[str]) -> list[str]:
        for size in sizes:
            parse_size(size)
        return sizes

    @field_validator("allowed_sizes")
    @classmethod
    def _check_sizes(cls, sizes: list[str]) -> list[str]:
        for size in sizes:
            width, height = parse_size(size)
            if width % 8 or height % 8 or not width or not height:
                raise ValueError(f"allowed size {size} is not a positive multiple of 8")
        return sizes

    @field_validator("default_size")
    @classmethod
    def _check_default_size(cls, size: str | None) -> str | None:
        if size is not None:
            parse_size(size)
        return size

    @field_validator("lora_modules")
    @classmethod
    def _check_lora_modules(cls, specs: list[str]) -> list[str]:
        names = [parse_lora_module(spec).name for spec in specs]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"LoRA adapter name {', '.join(repeated)} is given more than once")
        return specs

    @model_validator(mode="after")
    def _check_rank_groups(self) -> OmniDiffusionConfig:
        size = self.rank_group_size
        if self.num_gpus % size:
            raise ValueError(
                f"num_gpus must be data-parallel groups x cfg_parallel_size ({self.cfg_parallel_size}) x "
                f"ulysses_degree ({self.ulysses_degree}) x ring_degree ({self.ring_degree}) = groups x {size}, "
                f"but {self.num_gpus} is not a multiple of {size}"
            )
        return self

    @model_validator(mode="after")
    def _check_default_size_allowed(self) -> OmniDiffusionConfig:
        if self.default_size is not None and self.default_size not in self.allowed_sizes:
            raise ValueError(f"default_size {self.default_size} is not in allowed_sizes")
        return self

    @model_validator(mode="after")
    def _check_lora_settings(self) -> OmniDiffusionConfig:
        if self.allow_runtime_lora and not self.admin_api_key:
            raise ValueError(
                "allow_runtime_lora needs admin_api_key (IMAGEGEN_ADMIN_API_KEY): loading adapters changes the models "
                "every tenant sees"
            )
        if self.model_name in {parse_lora_module(spec).name for spec in self.lora_modules}:
            raise ValueError(f"a LoRA adapter cannot be named '{self.model_name}', the base model's id")
        return self

    @model_validator(mode="after")
    def _check_device_ids(self) -> OmniDiffusionConfig:
        if self.device_ids is not None and len(self.device_ids) != self.num_gpus:
            raise ValueError(f"device_ids names {len(self.device_ids)} devices for {self.num_gpus} ranks (num_gpus)")
        if len(self.models) > 1 and self.served_model_name:
            raise ValueError("served_model_name names one model: with several, give each its own in --models-file")
        return self

    @property
    def models(self) -> list[str]:
        """The models ``model`` names: one, or several for ``serve`` ("a,b")."""
        return [name.strip() for name in self.model.split(",") if name.strip()]

    def device_index(self, rank: int) -> int:
        """The CUDA device of ``rank``: device_ids[rank], or the rank itself."""
        return self.device_ids[rank] if self.device_ids else rank

    @property
    def lora_adapters(self) -> list[LoraModule]:
        """The start-up adapters of --lora-modules, parsed."""
        return [parse_lora_module(spec) for spec in self.lora_modules]

    @property
    def rank_group_size(self) -> int:
        """Ranks that make each image together: cfg_parallel_size x ulysses_degree x ring_degree."""
        return self.cfg_parallel_size * self.ulysses_degree * self.ring_degree

    @property
    def queued_images_per_key(self) -> int:
        """The cap in force on one key's waiting images: max_queued_images_per_key, or a quarter of max_queue_size."""
        return self.max_queued_images_per_key or max(1, self.max_queue_size // 4)

    @property
    def step_mode_room(self) -> int:
        """Requests step mode keeps sent to each rank group at once: twice what its running set takes,
        so that the worker chooses each iteration's batch among them (workers.runtime.step_batching.RunningSet)."""
        return 2 * self.max_batch_size

    def rank_group_of(self, rank: int) -> range:
        """The ranks of ``rank``'s group, its leader first: rank r is rank r % size of group r // size."""
        leader = rank - rank % self.rank_group_size
        return range(leader, leader + self.rank_group_size)

    @property
    def num_rank_groups(self) -> int:
        """Data-parallel groups: a step's requests are shared out among them."""
        return self.num_gpus // self.rank_group_size

    @property
    def cpu_threads_per_rank(self) -> int:
        """Torch threads of a rank on CPU: the machine's cores split over the ranks, so that the
        ranks' pipelines do not fight over them (every host of a worker uses this)."""
        return max(1, (os.cpu_count() or 1) // self.num_gpus)

    @property
    def model_name(self) -> str:
        """The id clients use for this model."""
        return self.served_model_name or self.model
