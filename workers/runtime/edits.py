"""Instruction-edit pipelines: models whose own call takes reference images (Kontext, Flux2,
Qwen-Image-Edit). They run on a path of their own, with no strength and no AutoPipeline variant."""

import inspect
from dataclasses import dataclass

from PIL import Image


@dataclass(frozen=True)
class EditPipeline:
    """What one edit pipeline class takes: how many reference images, whether a batch may give each
    prompt its own reference, whether it runs without images, and its inpaint variant (if any)."""

    max_input_images: int
    batches_references: bool
    text2img: bool
    inpaint_class: str | None = None


# By diffusers class name.
EDIT_PIPELINES: dict[str, EditPipeline] = {
    "FluxKontextPipeline": EditPipeline(1, True, True, "FluxKontextInpaintPipeline"),
    "Flux2Pipeline": EditPipeline(16, False, True),
    "Flux2KleinPipeline": EditPipeline(16, False, True),
    "QwenImageEditPipeline": EditPipeline(1, False, False, "QwenImageEditInpaintPipeline"),
    "QwenImageEditPlusPipeline": EditPipeline(16, False, False),
}


def edit_pipeline(pipeline) -> EditPipeline | None:
    """The edit table's entry for a loaded pipeline, or None for a text-to-image one."""
    return EDIT_PIPELINES.get(type(pipeline).__name__)


def reference_limits(pipeline) -> dict:
    """The smallest side and the most extreme aspect ratio the pipeline takes in a reference image, from
    its image processor's own check (Flux2's check_image_input); empty where it has none. The engine
    refuses other references with a 400 before a worker sees them."""
    check = getattr(getattr(pipeline, "image_processor", None), "check_image_input", None)
    if check is None:
        return {}
    defaults = {name: parameter.default for name, parameter in inspect.signature(check).parameters.items()}
    return {"min_side": defaults["min_side_length"], "max_aspect_ratio": defaults["max_aspect_ratio"]}


def edit_pipelines(pipeline) -> dict:
    """Task -> pipeline for an edit model: its own class does text-to-image (where allowed) and
    edits; the inpaint variant reuses the loaded modules (from_pipe: no second copy of the weights)."""
    import diffusers

    entry = edit_pipeline(pipeline)
    pipelines = {"img2img": pipeline}
    if entry.text2img:
        pipelines["text2img"] = pipeline
    if entry.inpaint_class is not None and hasattr(diffusers, entry.inpaint_class):
        inpaint = getattr(diffusers, entry.inpaint_class).from_pipe(pipeline)
        inpaint.set_progress_bar_config(disable=True)
        pipelines["inpaint"] = inpaint
    return pipelines


def edit_kwargs(entry: EditPipeline, group: list, parameters: dict, input_fidelity: str | None) -> dict:
    """The arguments an edit model's call over ``group`` takes beyond a text-to-image call's.

    A Kontext batch gives each prompt its own reference; other pipelines take one request per call
    and all its references, and make ``n`` images with ``num_images_per_prompt``."""
    kwargs: dict = {}
    first = group[0]
    if not first.images:
        pass  # text-to-image on an edit model: no references
    elif entry.batches_references:
        # One reference per prompt (max_input_images is 1 for such pipelines).
        kwargs["image"] = [Image.fromarray(r.images[0]) for r in group for _ in range(r.num_images)]
    else:
        (request,) = group
        kwargs["image"] = [Image.fromarray(image) for image in request.images]
        kwargs["num_images_per_prompt"] = request.num_images
        kwargs["prompt"] = request.prompt
    if "max_area" in parameters:
        # Kontext scales its output to max_area (1024² by default), images or not: keep the requested size.
        kwargs["max_area"] = first.width * first.height
    if "_auto_resize" in parameters:
        # "low" lets Kontext resize references to its preferred sizes; otherwise they go as sent.
        kwargs["_auto_resize"] = input_fidelity == "low"
    return kwargs
