"""`imagegen serve` and `imagegen worker`: every OmniDiffusionConfig field is a flag of the same name.
The client subcommands (generate, edit, models) are server/client_cli.py's."""

from __future__ import annotations

import argparse
import asyncio
import sys
import typing
from email.utils import formatdate
from typing import Any

from pydantic import ValidationError

from engine import OmniDiffusionConfig, configure_logging
from server import client_cli


def _flag_type(annotation: Any) -> tuple[Any, list | None]:
    """(argparse type, choices) for a settings field's annotation."""
    if typing.get_origin(annotation) is typing.Literal:
        return str, list(typing.get_args(annotation))
    options = [a for a in typing.get_args(annotation) if a is not type(None)] or [annotation]
    simple = options[0]
    return (simple if simple in (int, float) else str), None


def _add_setting_flags(parser: argparse.ArgumentParser, command: str) -> None:
    """One flag per settings field, with its aliases; on ``worker`` a field's worker_cli_aliases too,
    and the fields whose flags those aliases take over (--host, --port) are left out."""
    fields = OmniDiffusionConfig.model_fields
    extras = {name: f.json_schema_extra if isinstance(f.json_schema_extra, dict) else {} for name, f in fields.items()}
    worker_aliases = {alias for extra in extras.values() for alias in extra.get("worker_cli_aliases", [])}
    for name, field in fields.items():
        flag = f"--{name.replace('_', '-')}"
        aliases = list(extras[name].get("cli_aliases", []))
        if command == "worker":
            if flag in worker_aliases:
                continue
            aliases += extras[name].get("worker_cli_aliases", [])
        flag_type, choices = _flag_type(field.annotation)
        default = field.get_default(call_default_factory=True)
        if isinstance(default, list):
            default = ",".join(default)
        # A bool flag alone means true; "--flag false" still works. A list flag may take its items
        # space-separated (--lora-modules a=/x b=/y) where its field says so.
        switch = {"nargs": "?", "const": "true"} if field.annotation is bool else {}
        if "cli_nargs" in extras[name]:
            switch = {"nargs": extras[name]["cli_nargs"]}
        parser.add_argument(
            flag,
            *aliases,
            dest=name,
            type=flag_type,
            choices=choices,
            # Unset flags stay unset, so the environment can still supply them.
            default=argparse.SUPPRESS,
            help=f"{field.description} (default: {default})",
            **switch,
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="imagegen", description="OpenAI-compatible image generation server, and a client of it"
    )
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser(
        "serve",
        help="start the HTTP server",
        description="Start the HTTP server. Each flag also reads IMAGEGEN_<NAME> from the environment.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _add_setting_flags(serve, "serve")
    worker = commands.add_parser(
        "worker",
        help="serve one rank's worker over gRPC, for --backend grpc",
        description="Load the model and serve one rank over gRPC until SIGTERM. --host, --port and --rank are "
        "the worker's own (IMAGEGEN_WORKER_HOST, IMAGEGEN_WORKER_PORT, IMAGEGEN_WORKER_RANK); every other flag "
        "is the same as serve's and also reads IMAGEGEN_<NAME> from the environment.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _add_setting_flags(worker, "worker")
    client_cli.add_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command not in ("serve", "worker"):
        return client_cli.run(args)
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
    if args.command == "worker":
        if len(config.models) > 1:  # IMAGEGEN_MODEL may be the server's list, from a ConfigMap both read
            problem = f"a worker serves one model; --model names {len(config.models)}: {config.model}"
            print(f"imagegen: {problem}", file=sys.stderr)
            return 2
        from workers.hosts.grpc_server import run_worker
        from workers.logs import exit_at_once

        exit_at_once(run_worker(config))
    configure_logging(config.log_format, "server")
    return serve(config)


def serve(config: OmniDiffusionConfig) -> int:
    """Run the server until SIGINT/SIGTERM (exit 0) or until an engine turns fatal (exit 1)."""
    import uvicorn

    from engine.models import ModelRegistry
    from server.app import create_app
    from workers.model_settings import ModelSettingsError, model_settings

    try:
        registry = ModelRegistry(model_settings(config), config)
    except (ModelSettingsError, ValueError) as error:
        print(f"imagegen: invalid configuration: {error}", file=sys.stderr)
        return 2
    try:
        registry.preload()
    except Exception as error:  # noqa: BLE001 - start-up failures end in one line, not a traceback
        registry.close_engines()
        print(f"imagegen: {error}", file=sys.stderr)
        return 1
    app = create_app(registry)

    class Server(uvicorn.Server):
        """On the first SIGTERM/SIGINT, drain: keep listening but answer new work (and /ready) with 503
        until the queued and running requests are done, or shutdown_timeout_s has passed; then let
        uvicorn close. A second signal stops at once."""

        def handle_exit(self, sig: int, frame: Any) -> None:
            if registry.draining:
                super().handle_exit(sig, frame)
                return
            registry.start_draining()
            self._loop.call_soon_threadsafe(self._loop.create_task, self._drain())

        async def _drain(self) -> None:
            if not await registry.wait_idle(config.shutdown_timeout_s):
                registry.end_waits()  # the requests still waiting for a model load get 503, not a cut connection
            # Not super().handle_exit(): uvicorn would re-raise the signal at exit, and a drained
            # server should exit 0.
            self.should_exit = True

        async def serve(self, sockets: Any = None) -> None:
            self._loop = asyncio.get_running_loop()
            self._wake = self._loop.create_future()
            await super().serve(sockets)

        # uvicorn's own main loop wakes every 100 ms to look at should_exit and, each second, to refresh the Date
        # header: ~2 ms of the server's CPU per second while it waits, ~80 ms of each 1024x1024 image that takes 40 s
        # on CPU (docs/benchmarks.md, "Server CPU per image"). This one sleeps until should_exit is set (by a signal,
        # the drain or a monitor thread), and each response gets its Date as it starts (_with_date_header).
        @property
        def should_exit(self) -> bool:
            return self._should_exit

        @should_exit.setter
        def should_exit(self, value: bool) -> None:
            self._should_exit = value
            loop = getattr(self, "_loop", None)
            if value and loop is not None and not loop.is_closed():
                loop.call_soon_threadsafe(lambda: self._wake.done() or self._wake.set_result(None))

        async def main_loop(self) -> None:
            while not await self.on_tick(0):
                self._wake = self._loop.create_future()
                await self._wake

    server = Server(
        uvicorn.Config(
            _with_date_header(app),
            date_header=False,  # _with_date_header's instead
            host=config.host,
            port=config.port,
            log_level="info",
            # Our logging set-up (text or JSON) for uvicorn's lines too; the request log replaces its access log.
            log_config=None,
            access_log=False,
            timeout_graceful_shutdown=config.shutdown_timeout_s,
        )
    )
    # Setting should_exit from a worker-monitor thread wakes the main loop (Server.should_exit).
    registry.fatal_listeners.append(lambda reason: setattr(server, "should_exit", True))
    try:
        server.run()
    finally:
        registry.close_engines()
    if registry.fatal_error is not None:
        print(f"imagegen: exiting: {registry.fatal_error}", file=sys.stderr)
        return 1
    return 0


def _with_date_header(app: Any) -> Any:
    """``app`` with a Date header (RFC 9110) on each response, of the moment the response starts: in place of
    uvicorn's, which its main loop refreshes every second, awake or idle."""

    async def dated(scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return

        async def send_dated(message: dict) -> None:
            if message["type"] == "http.response.start":
                date = (b"date", formatdate(usegmt=True).encode())
                message = {**message, "headers": [*message.get("headers", ()), date]}
            await send(message)

        await app(scope, receive, send_dated)

    return dated


if __name__ == "__main__":
    sys.exit(main())
