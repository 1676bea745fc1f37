"""`imagegen serve`: every OmniDiffusionConfig field is a flag of the same name."""

from __future__ import annotations

import argparse
import asyncio
import sys
import typing
from typing import Any

from pydantic import ValidationError

from engine import DiffusionEngine, OmniDiffusionConfig, configure_logging


def _flag_type(annotation: Any) -> tuple[Any, list | None]:
    """(argparse type, choices) for a settings field's annotation."""
    if typing.get_origin(annotation) is typing.Literal:
        return str, list(typing.get_args(annotation))
    options = [a for a in typing.get_args(annotation) if a is not type(None)] or [annotation]
    simple = options[0]
    return (simple if simple in (int, float) else str), None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="imagegen", description="OpenAI-compatible image generation server")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser(
        "serve",
        help="start the HTTP server",
        description="Start the HTTP server. Each flag also reads IMAGEGEN_<NAME> from the environment.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for name, field in OmniDiffusionConfig.model_fields.items():
        flag_type, choices = _flag_type(field.annotation)
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        default = field.get_default(call_default_factory=True)
        if isinstance(default, list):
            default = ",".join(default)
        serve.add_argument(
            f"--{name.replace('_', '-')}",
            *extra.get("cli_aliases", []),
            dest=name,
            type=flag_type,
            choices=choices,
            # Unset flags stay unset, so the environment can still supply them.
            default=argparse.SUPPRESS,
            help=f"{field.description} (default: {default})",
        )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    flags = {name: value for name, value in vars(args).items() if name != "command"}
    try:
        config = OmniDiffusionConfig(**flags)
    except ValidationError as error:
        # One line, as every start-up error: "--flag: what is wrong" for each bad setting.
        problems = "; ".join(
            (f"--{str(e['loc'][0]).replace('_', '-')}: " if e["loc"] else "") + e["msg"].removeprefix("Value error, ")
            for e in error.errors()
        )
        print(f"imagegen: invalid configuration: {problems}", file=sys.stderr)
        return 2
    configure_logging(config.log_format, "server")
    return serve(config)


def serve(config: OmniDiffusionConfig) -> int:
    """Run the server until SIGINT/SIGTERM (exit 0) or until the engine turns fatal (exit 1)."""
    import uvicorn

    from server.app import create_app

    try:
        engine = DiffusionEngine(config)
    except Exception as error:  # noqa: BLE001 - start-up failures end in one line, not a traceback
        print(f"imagegen: could not start model '{config.model}': {error}", file=sys.stderr)
        return 1
    app = create_app(engine)

    class Server(uvicorn.Server):
        """On the first SIGTERM/SIGINT, drain: keep listening but answer new work (and /ready) with 503
        until the queued and running requests are done, or shutdown_timeout_s has passed; then let
        uvicorn close. A second signal stops at once."""

        def handle_exit(self, sig: int, frame: Any) -> None:
            front = getattr(app.state, "engine", None)
            if front is None or front.draining:
                super().handle_exit(sig, frame)
                return
            front.start_draining()
            self._loop.call_soon_threadsafe(self._loop.create_task, self._drain())

        async def _drain(self) -> None:
            await app.state.engine.wait_idle(config.shutdown_timeout_s)
            # Not super().handle_exit(): uvicorn would re-raise the signal at exit, and a drained
            # server should exit 0.
            self.should_exit = True

        async def serve(self, sockets: Any = None) -> None:
            self._loop = asyncio.get_running_loop()
            await super().serve(sockets)

    server = Server(
        uvicorn.Config(
            app,
            host=config.host,
            port=config.port,
            log_level="info",
            # Our logging set-up (text or JSON) for uvicorn's lines too; the request log replaces its access log.
            log_config=None,
            access_log=False,
            timeout_graceful_shutdown=config.shutdown_timeout_s,
        )
    )
    # uvicorn's loop polls should_exit, so setting it from a worker-monitor thread is safe.
    engine.fatal_listeners.append(lambda reason: setattr(server, "should_exit", True))
    try:
        server.run()
    finally:
        engine.close()
    if engine.fatal_error is not None:
        print(f"imagegen: exiting: {engine.fatal_error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
