"""LoRA settings, path checks and batching, without a model."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from server.cli import build_parser
from workers.config import LoraModule, OmniDiffusionConfig, parse_lora_module
from workers.data import LoraWeight, OmniDiffusionRequest, shard_requests
from workers.runtime.lora import LoraLoadError, resolve_lora_path


def test_lora_modules_parse_name_path_and_optional_scale():
    assert parse_lora_module("sharp=/loras/sharp.safetensors") == LoraModule("sharp", "/loras/sharp.safetensors", 1.0)
    assert parse_lora_module("pastel=/loras/pastel:0.8") == LoraModule("pastel", "/loras/pastel", 0.8)
    # A colon that is not followed by a number belongs to the path.
    assert parse_lora_module("odd=/loras/a:b") == LoraModule("odd", "/loras/a:b", 1.0)
    for bad in ("sharp", "=/x", "sharp=", "has space=/x", "../up=/x"):
        with pytest.raises(ValueError):
            parse_lora_module(bad)


def test_lora_modules_come_from_flags_space_separated_and_from_the_environment(monkeypatch):
    args = build_parser().parse_args(["serve", "--lora-modules", "a=/x", "b=/y:0.5"])
    config = OmniDiffusionConfig(**{k: v for k, v in vars(args).items() if k != "command"})
    assert config.lora_adapters == [LoraModule("a", "/x"), LoraModule("b", "/y", 0.5)]
    monkeypatch.setenv("IMAGEGEN_LORA_MODULES", "a=/x,b=/y:0.5")
    assert OmniDiffusionConfig().lora_adapters == config.lora_adapters


@pytest.mark.parametrize(
    "settings, words",
    [
        ({"lora_modules": ["a=/x", "a=/y"]}, "more than once"),
        ({"model": "tiny", "lora_modules": ["tiny=/x"]}, "base model"),
        ({"allow_runtime_lora": True}, "admin_api_key"),
    ],
)
def test_bad_lora_settings_are_refused_at_start_up(settings, words):
    with pytest.raises(ValidationError, match=words):
        OmniDiffusionConfig(**settings)


def test_lora_paths_are_confined_to_the_lora_dir_after_symlinks(tmp_path):
    root = tmp_path / "loras"
    (root / "sharp").mkdir(parents=True)
    (root / "sharp" / "pytorch_lora_weights.safetensors").write_bytes(b"")
    (root / "one.safetensors").write_bytes(b"")
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes(b"")
    (root / "link.safetensors").symlink_to(outside)
    assert resolve_lora_path("sharp", root) == root / "sharp" / "pytorch_lora_weights.safetensors"
    assert resolve_lora_path(str(root / "one.safetensors"), root) == root / "one.safetensors"
    assert resolve_lora_path(str(outside), None) == outside  # no --lora-dir: any path
    for path in ("../outside.safetensors", str(outside), "link.safetensors"):
        with pytest.raises(LoraLoadError, match="outside --lora-dir"):
            resolve_lora_path(path, root)


def test_a_lora_path_must_exist_and_hold_safetensors(tmp_path):
    (tmp_path / "adapter.bin").write_bytes(b"")
    (tmp_path / "two").mkdir()
    (tmp_path / "two" / "a.safetensors").write_bytes(b"")
    (tmp_path / "two" / "b.safetensors").write_bytes(b"")
    for path, words in (("missing", "does not exist"), ("adapter.bin", "not a .safetensors"), ("two", "2 .safetensors")):
        with pytest.raises(LoraLoadError, match=words):
            resolve_lora_path(path, tmp_path)


def test_requests_with_different_adapters_or_scales_never_share_a_call():
    def request(prompt: str, seed: int, *loras: LoraWeight) -> OmniDiffusionRequest:
        return OmniDiffusionRequest(prompt, height=64, width=64, num_inference_steps=2, seed=seed, loras=loras)

    base = request("a fox", 1)
    sharp, sharp_too = request("a cat", 2, LoraWeight("sharp", 1.0)), request("a dog", 3, LoraWeight("sharp", 1.0))
    weaker, pastel = request("a cow", 4, LoraWeight("sharp", 0.5)), request("a pig", 5, LoraWeight("pastel", 1.0))
    both = request("a hen", 6, LoraWeight("sharp", 1.0), LoraWeight("pastel", 1.0))
    assert sharp.batch_key() == sharp_too.batch_key()
    keys = {r.batch_key() for r in (base, sharp, weaker, pastel, both)}
    assert len(keys) == 5
    # Sharding keeps a group together: the two sharp requests land on one rank.
    shards = shard_requests([sharp, base, sharp_too, pastel], 2)
    assert any({sharp.request_id, sharp_too.request_id} <= {r.request_id for r in shard} for shard in shards)
