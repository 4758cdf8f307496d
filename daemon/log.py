"""structlog setup: JSON lines (or console), one logger per module, session id bound.

Everything the process says while it runs comes out here, in the one format: the
project's structlog loggers, the stdlib loggers of musetalk/ and of the libraries (the
LiveKit SDK forwards its Rust core's logs to the `livekit` logger), and Python warnings.
A log reader (journald, a log shipper, a test) then sees one JSON object a line.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import re
import sys
import threading
import warnings

import structlog

# Stdlib loggers of our own code: they log at the configured level. Every other library
# logs at WARNING and above only (aiohttp, httpx, LiveKit's Rust core say a lot at INFO).
OWN_STDLIB_LOGGERS = ("musetalk", "daemon")

_stdlib_handler: logging.Handler | None = None


class _Stderr:
    """stderr that never raises: a daemon whose log reader went away (a closed pipe)
    must still act on SIGTERM and shut down, not die on its next log line. One lock for
    every writer: structlog's lines and the stdlib handler's (the LiveKit SDK logs from
    its own thread) each arrive as one write and never interleave."""

    def __init__(self) -> None:
        self._lock = threading.Lock()

    def write(self, text: str) -> int:
        with self._lock:
            try:
                return sys.stderr.write(text)
            except (BrokenPipeError, OSError, ValueError):
                return 0

    def flush(self) -> None:
        try:
            sys.stderr.flush()
        except (BrokenPipeError, OSError, ValueError):
            pass


_STDERR = _Stderr()


def trace_fatal_signals() -> bool:
    """A native crash (SIGSEGV, SIGABRT, SIGBUS, SIGFPE, SIGILL) writes every thread's
    Python stack to stderr (the journal) before the process dies, so that it names its
    place; False where stderr is no file (a test's capture). Already on (``python -X
    faulthandler``, PYTHONFAULTHANDLER, a test runner): left as it is."""
    if faulthandler.is_enabled():
        return True
    try:
        faulthandler.enable(file=sys.stderr, all_threads=True)
    except (AttributeError, ValueError, OSError):  # io.UnsupportedOperation is both
        return False
    return True


def configure_logging(level: str = "INFO", fmt: str = "json") -> None:
    shared = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
        structlog.processors.format_exc_info,
    ]
    renderer = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    numeric = logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
    structlog.configure(
        processors=[*shared, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        # WriteLogger: the line and its newline in one write (print() makes two).
        logger_factory=structlog.WriteLoggerFactory(file=_STDERR),
        cache_logger_on_first_use=False,
    )
    _route_stdlib_logging(shared, renderer, numeric)
    warnings.showwarning = _log_warning


def _route_stdlib_logging(shared: list, renderer, level: int) -> None:
    """One root handler that renders stdlib records like structlog's own lines (the
    logger's name added); without it Python's last-resort handler prints them as bare
    text. Replaces the handler of an earlier call (tools configure logging again)."""
    global _stdlib_handler
    handler = logging.StreamHandler(_STDERR)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    ))
    root = logging.getLogger()
    if _stdlib_handler is not None:
        root.removeHandler(_stdlib_handler)
    root.addHandler(handler)
    _stdlib_handler = handler
    root.setLevel(max(level, logging.WARNING))
    for name in OWN_STDLIB_LOGGERS:
        logging.getLogger(name).setLevel(level)


def _log_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """`warnings.showwarning`: a warning as one log line, not two lines of bare text.
    The warning filters still decide what is shown (by default once per place)."""
    structlog.get_logger("py.warnings").warning(
        "python warning", category=category.__name__, message=str(message), where=f"{filename}:{lineno}"
    )


def quiet_model_libraries(progress_bars: bool = False) -> None:
    """transformers and diffusers attach their own stderr handler when imported, with
    propagation off, and nag at WARNING while loading weights (install `accelerate`,
    modules "kept in float32"); huggingface_hub and transformers draw progress bars
    ("Loading weights", "Writing model shards"). Here their records go to the root
    handler above, at ERROR unless TRANSFORMERS_VERBOSITY / DIFFUSERS_VERBOSITY say
    otherwise, and the bars are off unless ``progress_bars``. Imports both libraries
    (seconds): call it where the model is going to be loaded anyway."""
    import diffusers.utils.logging as diffusers_logging
    import huggingface_hub.utils as hub_utils
    import transformers.utils.logging as transformers_logging

    for lib, env in ((transformers_logging, "TRANSFORMERS_VERBOSITY"), (diffusers_logging, "DIFFUSERS_VERBOSITY")):
        if not os.environ.get(env):
            lib.set_verbosity_error()
        lib.disable_default_handler()
        lib.enable_propagation()
        if not progress_bars:
            lib.disable_progress_bar()
    if not progress_bars:
        hub_utils.disable_progress_bars()


def redact_url(url: str) -> str:
    """``url`` with its userinfo (``user:password@``) replaced by ``***``: what a log
    line or an error message may show of a server URL (NATS, LiveKit, a fetch). Scheme,
    host, port and path stay, so the line still says where; a comma-separated server
    list is redacted item by item. Text that is no URL comes back unchanged."""
    if "," in url:
        return ",".join(redact_url(part) for part in url.split(","))
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    # userinfo ends at the last "@" before the path: a password may itself hold "@" or "/".
    authority_end = len(rest)
    for mark in "?#":
        at = rest.find(mark)
        if at != -1:
            authority_end = min(authority_end, at)
    at = rest.rfind("@", 0, authority_end)
    if at == -1:
        return url
    return f"{scheme}://***@{rest[at + 1:]}"


_URL_USERINFO = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://)[^\s/@'\"]+@")


def redact_urls_in(text: str) -> str:
    """``text`` (an exception's message, a library's log line) with the userinfo of
    every URL in it replaced by ``***``."""
    return _URL_USERINFO.sub(r"\1***@", text)


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    return structlog.get_logger(name)
