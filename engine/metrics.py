"""Prometheus metrics of the engine and the server, all with the imagegen_ prefix and a model_name label."""

from prometheus_client import Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

REQUESTS = Counter("imagegen_requests", "HTTP requests answered", ["model_name", "endpoint", "status"])
E2E_LATENCY = Histogram(
    "imagegen_request_e2e_time_seconds", "Time from request received to response ready", ["model_name"],
    buckets=_LATENCY_BUCKETS,
)
QUEUE_TIME = Histogram(
    "imagegen_request_queue_time_seconds", "Time a request waited before its step started", ["model_name"],
    buckets=_LATENCY_BUCKETS,
)
INFERENCE_TIME = Histogram(
    "imagegen_request_inference_time_seconds", "Duration of the engine step that served a request", ["model_name"],
    buckets=_LATENCY_BUCKETS,
)
BATCH_SIZE = Histogram(
    "imagegen_batch_size_images", "Images per engine step", ["model_name"], buckets=(1, 2, 4, 8, 16, 32, 64)
)
IMAGES_GENERATED = Counter("imagegen_images_generated", "Images generated", ["model_name"])
REQUESTS_WAITING = Gauge("imagegen_num_requests_waiting", "Requests queued for a step", ["model_name"])
REQUESTS_RUNNING = Gauge("imagegen_num_requests_running", "Requests in a step that is running", ["model_name"])
WORKER_UP = Gauge("imagegen_worker_up", "1 while the worker of this rank is serving", ["model_name", "rank"])
RANK_GROUPS = Gauge(
    "imagegen_rank_groups",
    "Rank groups in each state: serving, set_aside (failed; probed until it answers again) or restarting",
    ["model_name", "state"],
)
WORKER_RESTARTS = Counter("imagegen_worker_restarts", "Workers replaced after dying or hanging", ["model_name"])
REQUESTS_REJECTED = Counter(
    "imagegen_requests_rejected", "Requests refused because the queue, or the sender's share of it, was full",
    ["model_name"],
)
REQUESTS_TIMED_OUT = Counter("imagegen_requests_timed_out", "Requests that ran past their deadline", ["model_name"])
REQUESTS_CANCELLED = Counter("imagegen_requests_cancelled", "Requests whose client went away first", ["model_name"])
STAGE_TIME = Histogram(
    "imagegen_request_stage_time_seconds",
    "Time of one stage of serving a request: text_encode, denoise, vae_decode (in the worker's pipeline "
    "call) and image_encode (PNG/JPEG/WebP: in the worker, a request's images together; in the server, each image "
    "a worker sent as pixels)",
    ["model_name", "stage"],
    buckets=_LATENCY_BUCKETS,
)
LORA_REQUESTS = Counter(
    "imagegen_lora_requests", "Requests served with a LoRA adapter (--lora-modules, run-time loads), by adapter",
    ["model_name", "lora_name"],
)
RECOMPILES = Counter(
    "imagegen_recompiles",
    "Graphs torch.compile made while serving, after the start-up warm-up (--compile): a size, batch size or "
    "cache switch the warm-up did not cover",
    ["model_name"],
)
RUNNING_SET_SIZE = Gauge(
    "imagegen_running_set_size",
    "Requests in a worker's running set after its latest denoising iteration (--scheduling step)",
    ["model_name", "rank"],
)
RUNNING_SET_ADMISSIONS = Histogram(
    "imagegen_running_set_admissions",
    "Requests that joined a worker's running set per denoising iteration (--scheduling step)",
    ["model_name"],
    buckets=(0, 1, 2, 4, 8, 16, 32),
)
MODEL_WEIGHT_BYTES = Gauge(
    "imagegen_model_weight_bytes",
    "Bytes of the loaded weights of each pipeline component on rank 0, as stored (quantized weights at their "
    "quantized size; --quantization)",
    ["model_name", "component"],
)

# -- several models per server (engine/models.py; docs/models.md) ------------------------------------------
MODEL_LOADED = Gauge("imagegen_model_loaded", "1 while the model is loaded and serving, else 0", ["model_name"])
MODEL_MEMORY_BYTES = Gauge(
    "imagegen_model_memory_bytes",
    "Bytes a loaded model takes on each device, as its workers measured it after loading (0 once unloaded)",
    ["model_name", "device"],
)
MODEL_LOAD_TIME = Histogram(
    "imagegen_model_load_seconds", "Time to load a model: start its workers until they serve", ["model_name"],
    buckets=(0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
)
MODEL_UNLOADS = Counter(
    "imagegen_model_unloads",
    "Models unloaded, by reason: idle (--model-keep-alive-s), room (another model needed it), admin",
    ["model_name", "reason"],
)
