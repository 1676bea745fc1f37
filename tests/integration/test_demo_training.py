"""The demo model's training script: a run stopped part-way resumes to exactly the same weights."""

import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "train_demo_model.py"
# A few tiny steps: enough to cross from the autoencoder phase into the denoiser phase.
SMALL_RUN = ["--vae-steps", "2", "--vae-whole-steps", "2", "--unet-steps", "3", "--vae-batch-size", "4", "--batch-size", "4",
             "--evaluation-prompts", "0", "--checkpoint-every", "100"]


def train(folder: Path, *extra: str) -> Path:
    output = folder / "model"
    subprocess.run([sys.executable, str(SCRIPT), *SMALL_RUN, "--output", str(output),
                    "--work-dir", str(folder / "work"), *extra], check=True, capture_output=True, timeout=300)
    return output


def weights(model: Path) -> dict:
    return {(component, name): tensor for component in ("vae", "text_encoder", "unet")
            for name, tensor in load_file(next((model / component).glob("*.safetensors"))).items()}


@pytest.mark.slow
def test_a_stopped_run_resumes_to_the_weights_of_an_uninterrupted_one(tmp_path):
    straight = weights(train(tmp_path / "straight"))
    resumed = tmp_path / "resumed"
    train(resumed, "--stop-after-steps", "2")  # stops inside the autoencoder phase
    train(resumed, "--stop-after-steps", "2")  # finishes it, stops inside the denoiser phase
    assert not (resumed / "model" / "model_index.json").exists()
    assert weights(train(resumed)).keys() == straight.keys()
    assert all((weights(resumed / "model")[key] == tensor).all() for key, tensor in straight.items())
    other_seed = weights(train(tmp_path / "other", "--seed", "1"))
    assert any((other_seed[key] != tensor).any() for key, tensor in straight.items())
