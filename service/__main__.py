"""`python -m service --model-repository REPO [--host H] [--port P] ...`

Flags come from `Settings` (pydantic-settings' CLI source), one per field, each also readable
from its `RESNET_SERVE_*` variable. On SIGTERM or SIGINT, /readyz turns 503 at once; after
`--drain-delay-ms` the listener closes, accepted requests finish (queued images included), the
models are released, and the process exits 0. Exit status 2: bad configuration or repository;
1: a model failed to load; 3: the server never started (for example, the port is taken).

With `--workers N` (N >= 2) this process becomes the engine process and starts N front-end
workers (service/processes.py); the signals, the drain and the exit statuses are the same.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import warnings
from collections.abc import Sequence

from pydantic import ValidationError
from pydantic_settings import CliApp, CliSettingsSource

from contract.repository import RepositoryError
from runtime.engines import EngineError

from .core.settings import ENV_PREFIX, Settings, is_env_only

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


def main(argv: Sequence[str] | None = None) -> int:
    settings = parse_settings(argv)
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # Pillow warns about corrupt metadata with texts built from the image's own numbers; every
    # distinct text would be printed once and kept in its registry for good.
    warnings.filterwarnings("ignore", module=r"PIL(\..*)?$")
    if settings.workers > 1:
        return _serve_workers(settings)
    return _serve(settings)


def _serve(settings: Settings) -> int:
    """One process: the app, its models and the servers."""
    from .core.registry import ModelRegistry
    from .protocols.app import create_app
    from .protocols.http_server import DrainingServer, http_config

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
    server = DrainingServer(http_config(app, settings), registry, settings.drain_delay_ms)
    # uvicorn re-raises the stop signal after its graceful shutdown; a graceful stop is a
    # success here, so let that re-raised signal end in `return` rather than a signal death.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    server.run()
    if registry.fatal is not None:
        log.critical("exiting: %s", registry.fatal)
        return 1
    return 0 if server.started else 3


def _serve_workers(settings: Settings) -> int:
    """This process holds the models; `workers` processes serve the ports (service/processes.py).
    No web or RPC framework is imported here."""
    if not hasattr(os, "memfd_create"):
        log.critical("cannot start: --workers > 1 needs Linux (memfd shared memory)")
        return 2
    from .processes import EngineProcess, serve

    try:
        engine = EngineProcess(settings)
    except (RepositoryError, EngineError, ValueError) as exc:
        log.critical("cannot start: %s", exc)
        return 2
    return serve(engine)


if __name__ == "__main__":
    sys.exit(main())
