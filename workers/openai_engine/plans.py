"""What the OpenAI engine sends for a job: the requests of a plan, their prompt and options.

The prompt is ``params.model_prompt`` (multi-prompt parts joined, weights and emphasis removed)
and the negative side (``--no`` and negative parts) becomes a closing "Avoid: …" sentence, since
the Images API has no negative prompt. ``--ar`` picks the model's nearest size, ``--quality`` its
quality, ``--stylize`` below 100 or ``--style raw`` dall-e-3's ``natural`` style; everything else
the API cannot do is noted, never refused.

Image inputs go through ``images.edit`` with the pictures for GPT image models, which take
several reference pictures and follow instructions about them: image prompts, ``--sref``,
``--cref``, ``--oref``, ``/blend`` and Vary (Region). Models that cannot get a note (image
prompts on dall-e models are left out) or, for jobs that need pictures, the GPT image model.
"""

from __future__ import annotations

import binascii
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import openai
from PIL import Image

from workers import imaging
from workers.image_input import decode_image, paste_outside, region_mask
from workers.openai_engine import canvas
from workers.openai_engine.models import (
    EDIT_FALLBACK_MODEL,
    ModelSpec,
    Size,
    model_spec,
    nearest_size,
    quality_option,
    size_text,
    style_option,
)
from workers.schema import (
    MAX_BLEND_IMAGES,
    ErrorCode,
    GenerationParams,
    JobRequest,
    ReferenceRole,
    WorkerError,
    b64decode_text,
)

DALLE2_MAX_UPLOAD = 4 * 1024 * 1024
# Subtle vary is img2img 0.5 on SDXL, strong 0.85; the API has no strength, so the split is by wording.
SUBTLE_BELOW = 0.7  # dall-e-2 rejects uploads of 4 MB or more (image and mask each)

# What each kind of reference asks of the model, in the order the pictures are attached.
ROLE_INSTRUCTIONS: dict[str, str] = {
    ReferenceRole.PROMPT.value: "use {which} as the starting point: its subject, composition and colours",
    ReferenceRole.STYLE.value: "paint in the style of {which}: medium, palette, brushwork and mood",
    ReferenceRole.CHARACTER.value: "keep the character from {which}: the same face, hair and clothes",
    ReferenceRole.OMNI.value: "include the subject of {which} as it is",
}
# images.edit requires a prompt, and a /blend result has no words: its zooms, pans, squares and
# regions say what to paint instead of failing.
OUTPAINT_INSTRUCTION = "Fill the transparent area so that it continues the picture seamlessly."
REGION_INSTRUCTION = "Repaint the transparent area so that it fits the rest of the picture."
ROLE_FLAGS = {
    ReferenceRole.PROMPT.value: "image prompts",
    ReferenceRole.STYLE.value: "--sref",
    ReferenceRole.CHARACTER.value: "--cref",
    ReferenceRole.OMNI.value: "--oref",
}


@dataclass
class Call:
    """One API request of a job: ``send`` performs it with the given client."""

    send: Callable[[openai.OpenAI], Any]
    n: int


@dataclass
class Plan:
    """The requests a job needs, the model and size they use, and notes for the member.

    ``finish`` (when set) is applied to every returned image, e.g. Vary (Region)'s paste-back.
    """

    calls: list[Call]
    model: str
    size: Size
    notes: list[str] = field(default_factory=list)
    finish: Callable[[Image.Image], Image.Image] | None = None


def prompt_text(params: GenerationParams, spec: ModelSpec, instruction: str | None = None) -> str:
    """The prompt sent to the API, with the negative side as an ``Avoid:`` sentence.

    The Images API has no negative-prompt parameter. Listing the unwanted things bare would ask
    for them (these models read the prompt as a description), so they go last as an explicit
    instruction, which DALL-E 3 and GPT image models follow reasonably well.
    """
    parts = [text for text in (params.model_prompt.strip(), instruction) if text]
    negative = params.model_negative.strip()
    if negative:
        parts.append(f"Avoid: {negative}.")
    prompt = "\n\n".join(parts)
    if not prompt:
        raise WorkerError(ErrorCode.BAD_INPUT, "The OpenAI engine needs a prompt for this job.")
    if len(prompt) > spec.prompt_limit:
        raise WorkerError(
            ErrorCode.BAD_INPUT,
            f"The prompt is too long for {spec.name}: {len(prompt)} characters, the limit is "
            f"{spec.prompt_limit} (the --no text counts too).",
        )
    return prompt


def ignored_params(params: GenerationParams, spec: ModelSpec) -> list[str]:
    """Member-facing notes for parameters the API cannot honour."""
    notes = []
    if params.tile:
        notes.append("--tile is not supported by the OpenAI engine and was ignored.")
    if params.steps is not None or params.sampler.value != "dpm":
        notes.append("--steps and --sampler only apply to SDXL and were ignored.")
    if params.chaos:
        notes.append("--chaos is not available on the OpenAI engine (its four images differ anyway).")
    if params.weird:
        notes.append("--weird is not available on the OpenAI engine and was ignored.")
    if params.stop < 100:
        notes.append("--stop is not available on the OpenAI engine: the images are finished.")
    if params.draft:
        notes.append("--draft is not available on the OpenAI engine: full images were made.")
    if len(params.parts) > 1 or any(part.emphasis for part in params.parts):
        notes.append("The OpenAI engine reads multi-prompt parts as one text: weights were not applied.")
    if params.stylize != 100 and style_option(spec, params.stylize, params.raw) is None:
        notes.append(f"--stylize has no equivalent on {spec.name} and was ignored.")
    return notes


def batches(count: int, max_n: int) -> list[int]:
    """Split ``count`` images into requests of at most ``max_n`` (dall-e-3: 4 requests of 1)."""
    count = max(1, count)
    full, rest = divmod(count, max_n)
    return [max_n] * full + ([rest] if rest else [])


def input_image(request: JobRequest) -> Image.Image:
    """The job's input image, or ``BAD_INPUT`` when missing or corrupt."""
    if not request.input_image:
        raise WorkerError(ErrorCode.BAD_INPUT, f"A {request.kind.value} job needs an input image.")
    try:
        data = b64decode_text(request.input_image)
    except (binascii.Error, ValueError):
        raise WorkerError(ErrorCode.BAD_INPUT, "The input image could not be read (bad encoding).") from None
    return imaging.decode_image(data)


def generate_options(spec: ModelSpec, params: GenerationParams, size: Size, prompt: str) -> dict[str, Any]:
    """Options shared by every request of a generation: model, prompt, size, quality, style."""
    options: dict[str, Any] = {"model": spec.name, "prompt": prompt, "size": size_text(size)}
    if spec.response_format:
        options["response_format"] = "b64_json"
    if quality := quality_option(spec, params.quality):
        options["quality"] = quality
    return options


def edit_options(
    spec: ModelSpec, params: GenerationParams, size: Size, instruction: str | None
) -> dict[str, Any]:
    """Options for ``images.edit`` (no style: edits have none)."""
    return generate_options(spec, params, size, prompt_text(params, spec, instruction))


def wordless(params: GenerationParams, instruction: str) -> str | None:
    """``instruction`` when the prompt has no words (a /blend result), else None: the prompt will do."""
    return None if params.model_prompt.strip() else instruction


def references(request: JobRequest) -> list[tuple[str, Image.Image]]:
    """The job's reference pictures as ``(role, picture)``, in role order (prompt, style, ...)."""
    out = []
    for role in ReferenceRole:
        for index, data in enumerate(request.reference_images(role), start=1):
            out.append((role.value, decode_image(data, f"{ROLE_FLAGS[role.value]} image {index}")))
    return out


def reference_instruction(roles: list[str]) -> str:
    """What to do with each attached picture, numbered in attachment order."""
    clauses = []
    for role in ROLE_INSTRUCTIONS:
        numbers = [str(index) for index, r in enumerate(roles, start=1) if r == role]
        if numbers:
            which = ("picture " if len(numbers) == 1 else "pictures ") + ", ".join(numbers)
            clauses.append(ROLE_INSTRUCTIONS[role].format(which=which))
    return "About the attached pictures: " + "; ".join(clauses) + "."


def _uploads(pictures: list[Image.Image]) -> list[tuple[str, bytes, str]]:
    return [
        (f"reference-{index}.png", imaging.encode_png(picture.convert("RGB")), "image/png")
        for index, picture in enumerate(pictures, start=1)
    ]


def _edit_calls(options: dict[str, Any], uploads: Any, count: int, max_n: int, **extra: Any) -> list[Call]:
    return [
        Call(lambda client, n=n: client.images.edit(image=uploads, n=n, **options, **extra), n)
        for n in batches(count, max_n)
    ]


def plan_generate(request: JobRequest, spec: ModelSpec) -> Plan:
    """IMAGINE / REROLL: a generation, or an edit with the reference pictures on GPT image models."""
    params = request.params
    refs = references(request)
    notes = ignored_params(params, spec)
    if refs and spec.family == "gpt-image":
        size = nearest_size(spec.edit_sizes, *params.aspect)
        roles = [role for role, _ in refs]
        options = edit_options(spec, params, size, reference_instruction(roles))
        if ReferenceRole.CHARACTER.value in roles and spec.name == "gpt-image-1":
            options["input_fidelity"] = "high"  # faces survive the edit more faithfully
        calls = _edit_calls(options, _uploads([picture for _, picture in refs]), request.count, spec.max_n)
        return Plan(calls, spec.name, size, notes)
    if refs:
        flags = sorted({ROLE_FLAGS[role] for role, _ in refs})
        notes.append(f"{spec.name} cannot take {', '.join(flags)}: ignored (GPT image models can use them).")
    # Sized from the --ar itself, not its rounded SDXL bucket (params.width/height): 4:3's
    # bucket, 1152x896, falls on the square side of dall-e-3's square/wide boundary.
    size = nearest_size(spec.sizes, *params.aspect)
    options = generate_options(spec, params, size, prompt_text(params, spec))
    if style := style_option(spec, params.stylize, params.raw):
        options["style"] = style
    calls = [
        Call(lambda client, n=n: client.images.generate(n=n, **options), n)
        for n in batches(request.count, spec.max_n)
    ]
    if spec.max_n == 1 and len(calls) > 1:
        notes.insert(0, f"{spec.name} makes one image per request: {len(calls)} requests were sent.")
    return Plan(calls, spec.name, size, notes)


def _gpt_image(spec: ModelSpec, what: str, notes: list[str]) -> ModelSpec:
    """``spec`` when it is a GPT image model, else the edit fallback model with a note."""
    if spec.family == "gpt-image":
        return spec
    notes.append(f"{spec.name} cannot {what}: made with {EDIT_FALLBACK_MODEL}.")
    return model_spec(EDIT_FALLBACK_MODEL)


def plan_blend(request: JobRequest, spec: ModelSpec) -> Plan:
    """BLEND: 2-5 pictures attached to one edit that asks for a single picture combining them."""
    pictures = [picture for role, picture in references(request) if role == ReferenceRole.PROMPT.value]
    if not 2 <= len(pictures) <= MAX_BLEND_IMAGES:
        raise WorkerError(
            ErrorCode.BAD_INPUT, f"A blend needs 2 to {MAX_BLEND_IMAGES} images, not {len(pictures)}."
        )
    notes: list[str] = []
    edit_spec = _gpt_image(spec, "blend pictures", notes)
    params = request.params
    size = nearest_size(edit_spec.edit_sizes, *params.aspect)
    instruction = (
        f"Blend the {len(pictures)} attached pictures into one new picture that merges their "
        "subjects, shapes, styles and colours."
    )
    options = edit_options(edit_spec, params, size, instruction)
    return Plan(
        _edit_calls(options, _uploads(pictures), request.count, edit_spec.max_n), edit_spec.name, size, notes
    )


def plan_region(request: JobRequest, spec: ModelSpec) -> Plan:
    """REGION: an edit with the mask converted to the API's convention (transparent = paint).

    The member's mask is white where to repaint; the API repaints where the mask is transparent.
    Outside the region the original is pasted back on every result, so only the region changes.
    """
    image = input_image(request)
    if not request.mask_image:
        raise WorkerError(ErrorCode.BAD_INPUT, "Vary (Region) needs a mask of the area to repaint.")
    mask = region_mask(decode_image(request.mask_image, "the region mask"), image.size)
    notes: list[str] = []
    edit_spec = spec if spec.edits else model_spec(EDIT_FALLBACK_MODEL)
    if edit_spec is not spec:
        notes.append(f"{spec.name} cannot edit images: this region was repainted with {edit_spec.name}.")
    size = nearest_size(edit_spec.edit_sizes, image.width, image.height)
    if edit_spec.square_edits and image.width != image.height:
        notes.append(f"{edit_spec.name} edits are square: the result is square.")
    picture = image.convert("RGB").resize(size, Image.Resampling.LANCZOS)
    region = mask.resize(size, Image.Resampling.NEAREST)
    api_mask = Image.new("RGBA", size, (0, 0, 0, 255))
    api_mask.putalpha(region.point(lambda value: 0 if value else 255))
    image_png, mask_png = imaging.encode_png(picture.convert("RGBA")), imaging.encode_png(api_mask)
    if edit_spec.square_edits and max(len(image_png), len(mask_png)) >= DALLE2_MAX_UPLOAD:
        raise WorkerError(ErrorCode.BAD_INPUT, "The image is too large to send to OpenAI.")
    options = edit_options(edit_spec, request.params, size, wordless(request.params, REGION_INSTRUCTION))
    mask_upload = ("mask.png", mask_png, "image/png")
    calls = _edit_calls(
        options, ("image.png", image_png, "image/png"), request.count, edit_spec.max_n, mask=mask_upload
    )
    feather = max(1, min(size) // 64)
    return Plan(
        calls,
        edit_spec.name,
        size,
        notes,
        finish=lambda result: paste_outside(result, picture, region, feather),
    )


def plan_variation(request: JobRequest, spec: ModelSpec, image: Image.Image) -> Plan:
    """VARIATION: dall-e-2's variation endpoint, else a GPT image edit worded subtle or strong."""
    notes: list[str] = []
    if spec.variations:
        # dall-e-2's own endpoint: square input, no prompt, which is what it is good at.
        size = (1024, 1024)
        if image.width != image.height:
            notes.append("dall-e-2 variations are square: the centre of the image was used.")
        png = imaging.encode_png(canvas.centre_square(image, size[0]))
        upload = ("image.png", png, "image/png")
        calls = [
            Call(
                lambda client, n=n: client.images.create_variation(
                    image=upload, model=spec.name, n=n, size=size_text(size), response_format="b64_json"
                ),
                n,
            )
            for n in batches(request.count, spec.max_n)
        ]
        return Plan(calls, spec.name, size, notes)

    # dall-e-3 has neither variations nor edits. A gpt-image-1 edit keeps the image's aspect
    # ratio and follows the prompt; dall-e-2's variation endpoint would force a square and a
    # different, older look, so gpt-image-1 is the closer fallback.
    edit_spec = spec if spec.edits else model_spec(EDIT_FALLBACK_MODEL)
    if edit_spec is not spec:
        notes.append(f"{spec.name} has no variations: made with {edit_spec.name} image edits.")
    subtle = request.strength is not None and request.strength < SUBTLE_BELOW
    instruction = (
        "A subtle variation of the input image: keep its composition, subject, palette and "
        "style; change only small details."
        if subtle
        else "A strong variation of the input image: same subject and style, with a freely "
        "reimagined composition, pose and details."
    )
    size = nearest_size(edit_spec.edit_sizes, image.width, image.height)
    options = edit_options(edit_spec, request.params, size, instruction)
    if edit_spec.name == "gpt-image-1":
        # The nearest thing the API has to a denoise strength.
        options["input_fidelity"] = "high" if subtle else "low"
    upload = ("image.png", imaging.encode_png(image.convert("RGB")), "image/png")
    calls = [
        Call(lambda client, n=n: client.images.edit(image=upload, n=n, **options), n)
        for n in batches(request.count, edit_spec.max_n)
    ]
    return Plan(calls, edit_spec.name, size, notes)


def plan_outpaint(
    request: JobRequest, spec: ModelSpec, image: Image.Image, layout: canvas.Layout, what: str
) -> Plan:
    """ZOOM / PAN / SQUARE: the layout's canvas and mask as one edit (``what`` names it in notes)."""
    notes: list[str] = []
    edit_spec = spec if spec.edits else model_spec(EDIT_FALLBACK_MODEL)
    if edit_spec is not spec:
        notes.append(f"{spec.name} cannot edit images: this {what} was made with {edit_spec.name}.")
    sizes = edit_spec.edit_sizes
    if edit_spec.square_edits and abs(layout.width - layout.height) > 1:
        notes.append(f"{edit_spec.name} edits are square: the result is square.")
    for index in range(len(sizes)):
        # dall-e-2 refuses uploads of 4 MB or more; a busy 1024² RGBA PNG can reach that.
        candidates = sizes[index:] if edit_spec.square_edits else sizes
        padded, mask, size = canvas.outpaint_canvas(image, layout, candidates)
        image_png, mask_png = imaging.encode_png(padded), imaging.encode_png(mask)
        if not edit_spec.square_edits or max(len(image_png), len(mask_png)) < DALLE2_MAX_UPLOAD:
            break
    else:
        raise WorkerError(ErrorCode.BAD_INPUT, "The image is too large to send to OpenAI.")
    options = edit_options(edit_spec, request.params, size, wordless(request.params, OUTPAINT_INSTRUCTION))
    upload = ("image.png", image_png, "image/png")
    mask_upload = ("mask.png", mask_png, "image/png")
    calls = [
        Call(lambda client, n=n: client.images.edit(image=upload, mask=mask_upload, n=n, **options), n)
        for n in batches(request.count, edit_spec.max_n)
    ]
    return Plan(calls, edit_spec.name, size, notes)
