"""`python -m service --model-repository REPO [--host H] [--port P] ...`

Flags come from `Settings` (pydantic-settings' CLI source), one per field, each also readable
from its `RESNET_SERVE_*` variable. On SIGTERM or SIGINT, /readyz turns 503 at once; after
`--drain-delay-ms` the listener closes, accepted requests finish (queued images included), the
models are released, and the process exits 0. Exit status 2: bad configuration or repository;
1: a model failed to load; 3: the server never started (for example, the port is taken).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import socket
import sys
import time
from collections.abc import Sequence
from types import FrameType

import uvicorn
from pydantic import ValidationError
from pydantic_settings import CliApp, CliSettingsSource

from contract.repository import RepositoryError
from runtime.engines import EngineError

from .core.registry import ModelRegistry
from .core.settings import ENV_PREFIX, Settings, is_env_only
from .protocols.app import create_app

log = logging.getLogger("service")


def build_parser() -> argparse.ArgumentParser:
    """The command line: one flag per field of `Settings` (pydantic-settings' CLI source adds
    them, with their help, default and variable); secrets are variables only."""
    parser = _parser()
    _cli_source(parser)
    return parser


def _parser() -> argparse.ArgumentParser:
    return argparse.ArgumentParser(
        prog="python -m service",
        description="Serve the models of a model repository over HTTP (and gRPC). Every flag can "
        f"also be set with the environment variable {ENV_PREFIX}<FLAG> (upper case, _ for -); "
        "flags win.",
        epilog="Environment only (secrets, never flags: a flag would show them to anyone who can "
        "list processes): "
        + "; ".join(
            f"{ENV_PREFIX}{name.upper()}: {field.description}"
            for name, field in Settings.model_fields.items()
            if is_env_only(name)
        ),
    )


def _cli_source(parser: argparse.ArgumentParser) -> CliSettingsSource[Settings]:
    return CliSettingsSource(
        Settings,
        root_parser=parser,
        cli_kebab_case=True,
        cli_implicit_flags=True,
        cli_show_env_vars=True,
        cli_hide_none_type=True,
        cli_avoid_json=True,
        cli_exit_on_error=True,
    )


def parse_settings(argv: Sequence[str] | None = None) -> Settings:
    """Settings from flags (which win) and environment variables; exits 2 when invalid."""
    parser = _parser()
    source = _cli_source(parser)
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        return CliApp.run(Settings, cli_args=args, cli_settings_source=source)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'settings'}: {e['msg']}" for e in exc.errors()
        )
        parser.error(problems)


ACCEPTED_GRACE_S = 0.25


class DrainingServer(uvicorn.Server):
    """uvicorn with a readiness flip on the first stop signal, and an optional drain delay
    between that flip and closing the listener."""

    def __init__(self, config: uvicorn.Config, registry: ModelRegistry, drain_ms: int) -> None:
        super().__init__(config)
        self._registry = registry
        self._drain_s = drain_ms / 1000.0
        self._stop_at: float | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self._registry.begin_draining()
        if self._drain_s > 0 and self._stop_at is None:
            self._stop_at = time.monotonic() + self._drain_s
            return
        super().handle_exit(sig, frame)

    async def on_tick(self, counter: int) -> bool:
        if self._stop_at is not None and time.monotonic() >= self._stop_at:
            self.should_exit = True
        return await super().on_tick(counter)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        """Close the listener, then let connections accepted just before deliver their request.

        uvicorn closes every connection with no request in progress at once; one accepted a
        moment earlier, whose request is still on its way, would be closed unanswered (seen
        under load in the container test: 1 of 75). After `ACCEPTED_GRACE_S` its request is
        in progress and is answered like any other.
        """
        for server in self.servers:
            server.close()
        for sock in sockets or []:
            sock.close()
        await asyncio.sleep(ACCEPTED_GRACE_S)
        await super().shutdown(sockets)


def main(argv: Sequence[str] | None = None) -> int:
    settings = parse_settings(argv)
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    server: DrainingServer | None = None

    def stop() -> None:
        if server is not None:
            server.should_exit = True

    try:
        app = create_app(settings, on_fatal=stop)
    except (RepositoryError, EngineError, ValueError) as exc:
        log.critical("cannot start: %s", exc)
        return 2
    registry: ModelRegistry = app.state.plane.registry
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        log_level=settings.log_level,
        access_log=settings.access_log,
        # h11 whatever else is installed: it refuses a request head that grows past 16 KiB,
        # where httptools (uvicorn's pick when present) buffers a header line without limit
        # (one connection sending a 256 MiB header took 320 MB of RSS, docs/reliability.md).
        http="h11",
        # Every accepted request ends by its own timeout; this only bounds a stuck shutdown.
        timeout_graceful_shutdown=settings.request_timeout_ms / 1000.0 + 5.0,
    )
    server = DrainingServer(config, registry, settings.drain_delay_ms)
    # uvicorn re-raises the stop signal after its graceful shutdown; a graceful stop is a
    # success here, so let that re-raised signal end in `return` rather than a signal death.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    server.run()
    if registry.fatal is not None:
        log.critical("exiting: %s", registry.fatal)
        return 1
    return 0 if server.started else 3


if __name__ == "__main__":
    sys.exit(main())
