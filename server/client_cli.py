"""`imagegen generate`, `imagegen edit`, `imagegen models`: a client of a running server.

It talks through the official ``openai`` SDK, so it behaves as any SDK program would: it reads
the client's variables (``OPENAI_BASE_URL``, ``OPENAI_API_KEY``; not ``IMAGEGEN_API_KEY``, the
server's list of accepted keys), retries a busy server (429) after its Retry-After and a
restarting one (503), and never retries what the server marks ``x-should-retry: false``. Images
are streamed with the ``progress`` extension, so the bar on stderr (a TTY only) moves at every
denoising step. A failure ends with exit code 1 and the server's message in one line.
"""

from __future__ import annotations

import argparse
import base64
import os
import sys
from pathlib import Path
from typing import Any

DEFAULT_URL = "http://127.0.0.1:8000"
# Sent when no key is given: the SDK insists on one, and a server without keys ignores it.
NO_API_KEY = "none"
# -o's suffix -> output_format.
_OUTPUT_FORMATS = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".webp": "webp"}


class ClientError(Exception):
    """A failure to report in one line (exit code 1)."""


def add_commands(commands: argparse._SubParsersAction) -> None:
    """The client subcommands, beside `serve`; their flags are their own, not settings."""
    connection = argparse.ArgumentParser(add_help=False)
    connection.add_argument(
        "--url",
        help=f"the server, http://host:port or its /v1 URL (default: $OPENAI_BASE_URL, else {DEFAULT_URL})",
    )
    connection.add_argument("--api-key", help="the key to send as Bearer (default: $OPENAI_API_KEY)")
    connection.add_argument(
        "--max-retries", type=int, default=2, help="retries of a busy (429) or unavailable server (default: 2)"
    )
    image = argparse.ArgumentParser(add_help=False)
    image.add_argument("-o", "--output", required=True, type=Path, help="file to write: out.png, then out-1.png, ...")
    image.add_argument("--n", type=int, help="number of images (default: 1)")
    image.add_argument("--size", help="WxH, e.g. 512x512 (default: the server's)")
    image.add_argument("--seed", type=int, help="seed of the first image; image i uses seed + i (default: random)")
    image.add_argument("--steps", type=int, help="denoising steps (default: the server's)")
    image.add_argument("--guidance-scale", type=float, help="classifier-free guidance (default: the model's)")
    image.add_argument("--negative-prompt", help="what the image should not show")
    image.add_argument("--model", help="the model to ask for (default: the one the server serves)")

    commands.add_parser(
        "models", parents=[connection], help="list the server's models", description="List the server's models."
    )
    generate = commands.add_parser(
        "generate",
        parents=[connection, image],
        help="generate images from a prompt",
        description="Generate images from a prompt on a running server; prints each file with its seed.",
    )
    generate.add_argument("prompt")
    edit = commands.add_parser(
        "edit",
        parents=[connection, image],
        help="edit an image (inpaint with --mask)",
        description="Edit an image: image-to-image, or inpainting where the mask is fully transparent.",
    )
    edit.add_argument("image", type=Path, help="PNG, JPEG or WebP")
    edit.add_argument("prompt")
    edit.add_argument("--mask", type=Path, help="PNG whose fully transparent pixels mark what to repaint")
    edit.add_argument("--strength", type=float, help="how far from the image, 0-1 (default: the pipeline's)")


def run(args: argparse.Namespace) -> int:
    """Run a client subcommand; 0, or 1 with one line on stderr."""
    import openai

    key = args.api_key or os.environ.get("OPENAI_API_KEY")
    try:
        client = openai.OpenAI(base_url=_base_url(args.url), api_key=key or NO_API_KEY, max_retries=args.max_retries)
        if args.command == "models":
            _list_models(client)
        else:
            _make_images(client, args)
    except openai.APIStatusError as error:
        no_key = error.status_code == 401 and not key
        hint = " (no API key was given: set OPENAI_API_KEY or --api-key)" if no_key else ""
        _fail(f"the server answered {error.status_code}: {_message(error)}{hint}")
    except openai.APIConnectionError as error:
        _fail(f"cannot reach the server at {client.base_url}: {error.__cause__ or error}")
    except openai.APIError as error:  # an error event in the stream
        _fail(f"the generation failed: {_message(error)}")
    except (ClientError, OSError) as error:
        _fail(str(error))
    else:
        return 0
    return 1


def _fail(message: str) -> None:
    print(f"imagegen: {' '.join(message.split())}", file=sys.stderr)


def _message(error: Any) -> str:
    """The server's own message (the OpenAI error body's), not the SDK's rendering of the body."""
    body = getattr(error, "body", None)
    if isinstance(body, dict) and isinstance(body.get("message"), str):
        return body["message"]
    return error.message


def _base_url(url: str | None) -> str:
    url = (url or os.environ.get("OPENAI_BASE_URL") or DEFAULT_URL).rstrip("/")
    return url if url.endswith("/v1") else f"{url}/v1"


def _list_models(client) -> None:
    for card in client.models.list():
        extra = card.model_extra or {}
        details = []
        if extra.get("status") and not extra.get("parent"):  # loaded, loading, unloaded, failed (and why)
            details.append(extra["status"] + (f": {extra['status_error']}" if extra.get("status_error") else ""))
        if extra.get("memory_bytes") and not extra.get("parent"):
            details.append("memory " + ", ".join(f"{d} {b / 2**20:.1f} MiB" for d, b in extra["memory_bytes"].items()))
        if extra.get("default_size"):
            details.append(f"default size {extra['default_size']}")
        if "tasks" in extra:
            details.append(f"tasks {', '.join(extra['tasks'])}")
        print("\t".join([card.id, *details]))


def _make_images(client, args: argparse.Namespace) -> None:
    output_format = _OUTPUT_FORMATS.get(args.output.suffix.lower())
    if output_format is None:
        raise ClientError(f"-o {args.output}: name a .png, .jpg or .webp file")
    options: dict[str, Any] = {"prompt": args.prompt, "output_format": output_format, "stream": True}
    options.update({name: value for name in ("n", "size", "model") if (value := getattr(args, name)) is not None})
    extra_body: dict[str, Any] = {"progress": True}
    for name, value in (
        ("seed", args.seed),
        ("num_inference_steps", args.steps),
        ("guidance_scale", args.guidance_scale),
        ("negative_prompt", args.negative_prompt),
        ("strength", getattr(args, "strength", None)),
    ):
        if value is not None:
            extra_body[name] = value
    if args.command == "edit":
        files = [_read(args.image)] + ([_read(args.mask)] if args.mask else [])
        events = client.images.edit(
            image=files[0], **({"mask": files[1]} if args.mask else {}), extra_body=extra_body, **options
        )
    else:
        events = client.images.generate(extra_body=extra_body, **options)
    for path, seed in _write_images(events, args.output):
        print(f"{path}\tseed {seed}")


def _read(path: Path) -> tuple[str, bytes]:
    try:
        return path.name, path.read_bytes()
    except OSError as error:
        raise ClientError(f"cannot read {path}: {error.strerror}") from error


def _write_images(events, output: Path) -> list[tuple[Path, int]]:
    """Save each completed image of the stream as it comes (output, output-1, ...); a progress bar
    on stderr, when it is a terminal, moves at each progress event."""
    from tqdm import tqdm

    written = []
    with tqdm(
        total=None,
        unit="step",
        file=sys.stderr,
        disable=not sys.stderr.isatty(),
        # Drawn at every step: a step takes far longer than drawing the bar.
        mininterval=0,
        miniters=1,
        dynamic_ncols=True,
    ) as bar:
        for event in events:
            kind = event.type.rsplit(".", 1)[-1]
            extra = event.model_extra or {}
            if kind == "progress":
                bar.total = extra["total_steps"]
                # Not redrawn here: the bar draws once per event, at its update.
                bar.set_description("loading the model" if extra.get("stage") == "loading_model" else "", refresh=False)
                bar.update(extra["step"] - bar.n)
            elif kind == "completed":
                index = len(written)
                path = output if index == 0 else output.with_name(f"{output.stem}-{index}{output.suffix}")
                path.write_bytes(base64.b64decode(event.b64_json))
                written.append((path, extra.get("seed")))
    return written
