"""RequestRules on the descriptions workers give: an instruction-edit model that takes several images and
cannot make one from text alone (as QwenImageEditPlusPipeline describes itself), and a text-to-image one."""

from __future__ import annotations

import numpy as np
import pytest

from engine import InvalidRequestError, OmniDiffusionConfig, OmniDiffusionRequest
from engine.requests import RequestRules
from workers.data import defaults_in_force


def described(pipeline: str, **fields) -> dict:
    """A worker's describe() reply, reduced to what the rules read."""
    return {
        "pipeline": pipeline,
        "tasks": ["img2img", "text2img"],
        "edit_model": False,
        "max_input_images": 1,
        "size_multiple": 16,
        "native_size": "64x64",
        "model_defaults": {},
        "default_strength": {"img2img": 0.6},
        **fields,
    }


QWEN_EDIT_PLUS = described(
    "QwenImageEditPlusPipeline", tasks=["img2img"], edit_model=True, max_input_images=16, default_strength={}
)


def rules(model_info: dict, **settings) -> RequestRules:
    config = OmniDiffusionConfig(model="tiny", served_model_name="m", **settings)
    return RequestRules(config, model_info, defaults_in_force(config, model_info), loras=None)


def picture(width: int, height: int, value: int = 0) -> np.ndarray:
    return np.full((height, width, 3), value, np.uint8)


def refused(rules: RequestRules, request: OmniDiffusionRequest) -> InvalidRequestError:
    with pytest.raises(InvalidRequestError) as caught:
        rules.prepare(request)
    return caught.value


def test_an_edit_model_without_text_to_image_refuses_a_prompt_alone_naming_the_model():
    error = refused(rules(QWEN_EDIT_PLUS), OmniDiffusionRequest("a fox"))
    assert error.param == "model"
    assert "'m' edits images and cannot make one from text alone" in str(error)
    assert "QwenImageEditPlusPipeline" in str(error)


def test_references_keep_their_size_and_order_and_the_size_follows_the_first_rounded_to_the_multiple():
    images = [picture(70, 50, 1), picture(300, 20, 2), picture(16, 16, 3)]
    prepared = rules(QWEN_EDIT_PLUS).prepare(OmniDiffusionRequest("put them together", images=images))
    assert (prepared.width, prepared.height) == (64, 48)  # 70x50 to the nearest multiples of 16
    assert [image.shape for image in prepared.images] == [image.shape for image in images]
    assert [int(image[0, 0, 0]) for image in prepared.images] == [1, 2, 3]


def test_a_first_image_over_the_pixel_limit_is_scaled_down_within_it():
    prepared = rules(QWEN_EDIT_PLUS, max_output_pixels=512 * 512).prepare(
        OmniDiffusionRequest("wider", images=[picture(2000, 1000)])
    )
    assert prepared.width * prepared.height <= 512 * 512
    assert prepared.width % 16 == prepared.height % 16 == 0
    assert (prepared.width, prepared.height) == (720, 352)  # 2000x1000 x sqrt(512² / 2e6), down to multiples of 16


def test_more_images_than_the_model_takes_is_a_400_naming_its_limit():
    error = refused(rules(QWEN_EDIT_PLUS), OmniDiffusionRequest("x", images=[picture(16, 16)] * 17))
    assert error.param == "image" and "17 images were sent; the model 'm' takes at most 16" in str(error)
    two = OmniDiffusionRequest("x", images=[picture(64, 64)] * 2)
    error = refused(rules(described("StableDiffusionPipeline")), two)
    assert "takes at most 1 per request" in str(error)


def test_a_text_to_image_models_edit_is_resized_to_the_output_size_and_defaults_to_a_served_size():
    text_to_image = rules(described("StableDiffusionPipeline"))
    own_size = text_to_image.prepare(OmniDiffusionRequest("x", images=[picture(32, 48)]))
    assert (own_size.width, own_size.height) == (32, 48)
    unserved = text_to_image.prepare(OmniDiffusionRequest("x", images=[picture(30, 50)]))
    assert (unserved.width, unserved.height) == (64, 64)  # the default size, not 30x50
    assert unserved.images[0].shape == (64, 64, 3)


def test_a_mask_needs_an_image_and_input_fidelity_is_dropped_for_text_to_image_models():
    text_to_image = rules(described("StableDiffusionPipeline"))
    error = refused(text_to_image, OmniDiffusionRequest("x", mask=np.zeros((64, 64), np.uint8)))
    assert error.param == "mask"
    prepared = text_to_image.prepare(OmniDiffusionRequest("x", images=[picture(64, 64)], input_fidelity="high"))
    assert prepared.input_fidelity is None
    kept = rules(QWEN_EDIT_PLUS).prepare(OmniDiffusionRequest("x", images=[picture(64, 64)], input_fidelity="high"))
    assert kept.input_fidelity == "high"


def test_references_outside_the_pipelines_own_limits_are_a_400_naming_the_image():
    flux2 = rules({**QWEN_EDIT_PLUS, "reference_limits": {"min_side": 64, "max_aspect_ratio": 8}})
    flux2.prepare(OmniDiffusionRequest("x", images=[picture(64, 64), picture(512, 64)]))
    for too_small_or_too_thin in (picture(63, 64), picture(520, 64)):
        error = refused(flux2, OmniDiffusionRequest("x", images=[picture(64, 64), too_small_or_too_thin]))
        assert error.param == "image" and str(error).startswith("image 1 is ")


@pytest.mark.parametrize(
    "fields, param", [({"output_format": "gif"}, "output_format"), ({"output_compression": 101}, "output_compression")]
)
def test_a_file_the_workers_cannot_write_is_a_400_before_any_denoising(fields, param):
    text_to_image = rules(described("StableDiffusionPipeline"))
    assert refused(text_to_image, OmniDiffusionRequest("a fox", **fields)).param == param
    prepared = text_to_image.prepare(OmniDiffusionRequest("a fox", output_format="webp", output_compression=0))
    assert (prepared.output_format, prepared.output_compression) == ("webp", 0)
