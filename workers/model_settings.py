"""The settings of each model a server serves: ``--model a b`` (every model gets the server-wide settings) or
``--models-file`` (a YAML list of entries, each overriding them). See docs/models.md.

An entry's keys are the settings fields that belong to one model (MODEL_FIELDS); the rest are the server's
(host, port, keys, queue and body limits, storage, fairness) and are refused in an entry, by name. An entry
starts from the server-wide settings and is validated by the same OmniDiffusionConfig, so whatever holds
for one model holds for an entry.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import ValidationError

from workers.config import OmniDiffusionConfig

# The fields one model may set for itself: what loads it, where it runs, how it batches and what it accepts.
MODEL_FIELDS = frozenset({
    "model", "served_model_name", "model_cache_dir", "num_gpus", "device_ids",
    "cfg_parallel_size", "ulysses_degree", "ring_degree", "rank_group_address",
    "distributed_executor_backend", "device", "dtype", "max_batch_size", "batch_timeout_ms", "scheduling",
    "rpc_timeout_s", "worker_start_timeout_s", "default_size", "default_num_inference_steps",
    "default_guidance_scale", "max_num_inference_steps", "allowed_sizes", "max_output_pixels",
    "on_worker_death", "health_check_interval_s",
    "ray_address", "ray_namespace", "worker_actor_names", "ray_cpus_per_worker", "ray_placement_strategy",
    "ray_rank_resources", "worker_addresses", "worker_token", "worker_tls_ca",
    "inpaint_keep_unmasked", "cache_method", "cache_options", "compile", "compile_warmup_sizes",
    "attention_backend", "offload", "vae_tiling", "vae_slicing", "quantization", "quantize_components",
    "denoiser_file", "lora_modules", "max_loras_per_request", "lora_dir", "preload", "model_keep_alive_s",
})
# An entry's key -> the settings field it sets: the field's own name, or the short name the entry reads better with.
ENTRY_KEYS = {**{name: name for name in MODEL_FIELDS - {"model_keep_alive_s"}}, "keep_alive_s": "model_keep_alive_s"}
# The settings of the server alone; with MODEL_FIELDS, every field (tests/unit checks it).
SERVER_FIELDS = frozenset(OmniDiffusionConfig.model_fields) - MODEL_FIELDS
# Backends whose workers someone else starts: the server cannot load or unload their model.
EXTERNAL_BACKENDS = ("grpc", "ray_external")


class ModelSettingsError(ValueError):
    """A models file, or the models of ``--model``, cannot be served; the message names the entry and key."""


def model_settings(config: OmniDiffusionConfig) -> list[OmniDiffusionConfig]:
    """One settings object per model ``config`` asks for, in order (the first takes requests that name no
    model): the entries of ``models_file``, else each model of ``model`` with the server-wide settings."""
    if config.models_file is not None:
        entries = read_models_file(config.models_file)
        where = f"models file {config.models_file}"
    else:
        entries = [{"model": name} for name in config.models]
        where = "--model"
    settings = [_entry_settings(config, entry, f"{where}, entry {index + 1}") for index, entry in enumerate(entries)]
    check_names(settings, where)
    return settings


def read_models_file(path: Path) -> list[dict[str, Any]]:
    """The entries of a models file (YAML: a list of mappings)."""
    import yaml

    try:
        entries = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as error:
        raise ModelSettingsError(f"models file {path}: {error}") from None
    if not isinstance(entries, list) or not entries or not all(isinstance(entry, dict) for entry in entries):
        raise ModelSettingsError(f"models file {path}: must be a non-empty list of entries (key: value mappings)")
    return entries


def _entry_settings(config: OmniDiffusionConfig, entry: dict[str, Any], where: str) -> OmniDiffusionConfig:
    if "model" not in entry:
        raise ModelSettingsError(f"{where}: every entry needs a 'model' key")
    where = f"{where} ({entry['model']})"
    for key in entry:
        if key in SERVER_FIELDS:
            raise ModelSettingsError(f"{where}: '{key}' is a server-wide setting; set it for the whole server")
        if key not in ENTRY_KEYS:
            raise ModelSettingsError(f"{where}: unknown key '{key}'")
    if "," in str(entry["model"]):
        raise ModelSettingsError(f"{where}: 'model' names one model per entry")
    # The settings the server was given, not its defaults: an entry's config then tells a default from a choice
    # (model_fields_set), as the server's own does.
    server_wide = {name: getattr(config, name) for name in config.model_fields_set if name != "models_file"}
    try:
        return OmniDiffusionConfig(**{**server_wide, **{ENTRY_KEYS[key]: value for key, value in entry.items()}})
    except ValidationError as error:
        fields = {field: key for key, field in ENTRY_KEYS.items()}
        problems = "; ".join(
            (f"'{fields.get(str(e['loc'][0]), e['loc'][0])}': " if e["loc"] else "")
            + e["msg"].removeprefix("Value error, ")
            for e in error.errors()
        )
        raise ModelSettingsError(f"{where}: {problems}") from None


def check_names(settings: list[OmniDiffusionConfig], where: str = "") -> None:
    """Model ids and LoRA adapter names are one namespace (a request's ``model``): no name twice."""
    owners: dict[str, str] = {}
    for config in settings:
        names = [(config.model_name, "a model")]
        names += [(adapter.name, f"a LoRA adapter of '{config.model_name}'") for adapter in config.lora_adapters]
        for name, what in names:
            if name in owners:
                raise ModelSettingsError(
                    f"{where}: the name '{name}' is {owners[name]} and {what}: a model id names one"
                )
            owners[name] = what


def is_external(config: OmniDiffusionConfig) -> bool:
    """Whether the model's workers are started by someone else (the server cannot load or unload it)."""
    return config.distributed_executor_backend in EXTERNAL_BACKENDS
