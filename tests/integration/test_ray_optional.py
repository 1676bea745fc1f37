"""Ray is an optional extra: everything else works without it, and the Ray backends say how to get it."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from helpers import ROOT
from pydantic import ValidationError

from engine import OmniDiffusionConfig
from server.cli import build_parser

HINT = "pip install 'imagegen[ray]'"

# sys.modules["ray"] = None makes every `import ray` fail, as on a machine without Ray.
WITHOUT_RAY = textwrap.dedent(
    """
    import sys
    sys.modules["ray"] = None
    import executors
    from executors import DiffusionExecutor, ExternalDiffusionExecutor, get_executor_class
    assert get_executor_class("mp").__name__ == "MultiProcDiffusionExecutor"
    for backend in ("ray", "ray_external"):
        try:
            get_executor_class(backend)
        except ImportError as error:
            print(f"{backend}: {error}")
    try:
        from executors.ray_external import RayDiffusionWorkerActor, RayExternalDiffusionExecutor
    except ImportError as error:
        print(f"import: {error}")
    from server.cli import main
    sys.exit(main(["serve", "--backend", "ray", "--port", "0"]))
    """
)


def test_without_ray_executors_import_and_ray_backends_explain_the_install():
    result = subprocess.run([sys.executable, "-c", WITHOUT_RAY], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.stdout.splitlines() == [
        f"ray: the Ray backends need Ray: {HINT}",
        f"ray_external: the Ray backends need Ray: {HINT}",
        f"import: the Ray backends need Ray: {HINT}",
    ]
    assert result.returncode == 1
    assert f"imagegen: could not start model 'tiny': the Ray backends need Ray: {HINT}" in result.stderr
    assert "Traceback" not in result.stderr


def test_ray_settings_come_from_flags_and_environment(monkeypatch):
    args = build_parser().parse_args(
        [
            "serve",
            "--backend",
            "ray_external",
            "--worker-actor-names",
            "a, b",
            "--ray-address",
            "127.0.0.2:6379",
            "--ray-namespace",
            "team",
            "--ray-rank-resources",
            '[{"node_a": 1}, {"node_b": 1}]',
            "--ray-placement-strategy",
            "STRICT_SPREAD",
            "--ray-cpus-per-worker",
            "2",
        ]
    )
    config = OmniDiffusionConfig(**{name: value for name, value in vars(args).items() if name != "command"})
    assert config.worker_actor_names == ["a", "b"]
    assert (config.ray_address, config.ray_namespace) == ("127.0.0.2:6379", "team")
    assert config.ray_rank_resources == [{"node_a": 1.0}, {"node_b": 1.0}]
    assert (config.ray_placement_strategy, config.ray_cpus_per_worker) == ("STRICT_SPREAD", 2.0)

    monkeypatch.setenv("IMAGEGEN_WORKER_ACTOR_NAMES", "w0,w1,w2")
    monkeypatch.setenv("IMAGEGEN_RAY_RANK_RESOURCES", '[{"gpu_box": 1}]')
    config = OmniDiffusionConfig()
    assert config.worker_actor_names == ["w0", "w1", "w2"]
    assert config.ray_rank_resources == [{"gpu_box": 1.0}]
    assert OmniDiffusionConfig(worker_actor_names=["x"]).worker_actor_names == ["x"]


@pytest.mark.parametrize(
    "field, value",
    [("ray_rank_resources", "{not json"), ("ray_placement_strategy", "EVERYWHERE"), ("ray_cpus_per_worker", 0)],
)
def test_invalid_ray_settings_are_rejected(field, value):
    with pytest.raises(ValidationError, match=field):
        OmniDiffusionConfig(**{field: value})
