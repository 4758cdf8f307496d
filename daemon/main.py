"""`lipsyncd`: the daemon's entry point."""

from __future__ import annotations

import argparse
import asyncio
import atexit
import os
import sys
from typing import NoReturn

import uvloop

from daemon.config import ConfigError, load_settings
from daemon.errors import LipsyncError
from daemon.log import configure_logging, get_logger, quiet_model_libraries, trace_fatal_signals

log = get_logger(__name__)

# sysexits' EX_CONFIG: a restart cannot help (bad config, weights missing); the systemd
# units do not restart on it (RestartPreventExitStatus).
EXIT_CONFIG = 78
# Startup failures (LipsyncError codes) that only a change of config or files can fix.
CONFIG_FAILURES = ("models_missing", "config_invalid")


def main(argv: list[str] | None = None) -> int:
    trace_fatal_signals()
    parser = argparse.ArgumentParser(prog="lipsyncd", description="MuseTalk lip-sync video daemon")
    parser.add_argument("--config", help="config file (default: $LIPSYNC_CONFIG or ./config.toml)")
    args = parser.parse_args(argv)
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        print(f"lipsyncd: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    configure_logging(settings.logging.level, settings.logging.format)
    # Not uvloop.run(): closing the loop waits for the default executor's threads, and a
    # start-up stopped by a signal may leave the model loading in one for many seconds.
    # Everything the daemon owns is released inside _run; the process then just leaves.
    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    if settings.daemon.edge_processes > 1:  # a GPU server and N edges (daemon.supervisor)
        _exit(loop.run_until_complete(_supervise(settings, args.config)))
    _exit(loop.run_until_complete(_run(settings)))


async def _supervise(settings, config_path: str | None) -> int:
    from daemon.supervisor import Supervisor

    problem = settings.livekit_problem() or settings.gpu_process_problem()
    if problem is not None:
        log.error("startup failed", code="config_invalid", error=problem)
        return EXIT_CONFIG
    return await Supervisor(settings, config_path).run()


def _exit(code: int) -> NoReturn:
    """Leave as soon as the daemon has shut down, without the interpreter's teardown.

    By the time ``_run`` returns, everything the daemon owns has been released in order:
    sessions stopped and their MP4s finalized, NATS drained and closed, the embedded
    nats-server stopped, the generation worker joined. What is left is Python freeing the
    thousands of modules torch, transformers and diffusers import, object by object, and
    on a GPU the CUDA context: 1-3 s after "lipsyncd stopped" during which systemd (and a
    restart), a terminal or a test waits on a process with nothing left to do. atexit
    handlers still run (libraries' own clean-up: logging, worker pools), then the output
    is flushed and the process exits with ``code``.
    """
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed or gone (a pipe whose reader left)
            pass
    os._exit(code)


async def _run(settings) -> int:
    from daemon.app import Daemon

    daemon = Daemon(settings)
    # First of all: a SIGTERM or Ctrl-C while the model loads must stop the daemon
    # cleanly (exit 0, its nats-server stopped), not kill it or be ignored.
    daemon.install_signal_handlers()
    try:
        daemon.check_config()  # at once, not after the model libraries have loaded
        if settings.model.enabled:
            # Before the model loads: its libraries' nags and bars would be bare text.
            quiet_model_libraries(progress_bars=settings.logging.format == "console" and sys.stderr.isatty())
        started = await daemon.start_unless_stopped()
    except LipsyncError as exc:
        log.error("startup failed", code=exc.code, error=exc.message)
        await daemon.aclose()
        return EXIT_CONFIG if exc.code in CONFIG_FAILURES else 1
    try:
        if started:
            await daemon.run()
    finally:
        await daemon.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
