"""`lipsync`: tools beside the daemon (the `nats` CLI equivalents, models, render, bench)."""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from pathlib import Path
from typing import Any

from daemon.config import ConfigError, NatsSection, Settings, load_settings
from daemon.log import redact_url, redact_urls_in, trace_fatal_signals


def _nats_url(settings: Settings, override: str | None) -> str:
    if override:
        return override
    if settings.nats.url == "embedded":
        return f"nats://{settings.nats.embedded_host}:{settings.nats.embedded_port}"
    return settings.nats.url.split(",")[0].strip()


def _refused_credentials(exc: BaseException) -> bool:
    """The server turned the connection down for its credentials (nats-py says so with
    AuthorizationError, or with the server's -ERR 'Authorization Violation' text)."""
    from nats.errors import AuthorizationError

    return isinstance(exc, AuthorizationError) or "authoriz" in str(exc).lower()


_CREDENTIALS_HINT = ("set nats.user + nats.password, nats.token or nats.creds_file (env LIPSYNC_NATS__USER, "
                     "LIPSYNC_NATS__PASSWORD, LIPSYNC_NATS__TOKEN, LIPSYNC_NATS__CREDS_FILE) as the daemon has them")


async def _connect(url: str, cfg: NatsSection):
    """One attempt, with the daemon's own credentials and TLS settings (bus.auth_options)."""
    import nats

    from daemon.bus import auth_options

    async def no_errors(exc: Exception) -> None:
        pass  # reported once below, not as a traceback per attempt

    try:
        return await asyncio.wait_for(
            nats.connect(url, connect_timeout=2, max_reconnect_attempts=0, allow_reconnect=False,
                         error_cb=no_errors, **auth_options(cfg)),
            timeout=4,
        )
    except (Exception, asyncio.TimeoutError) as exc:
        # Neither the URL nor the client's message may show a password given in the URL.
        why = redact_urls_in(str(exc)) or type(exc).__name__
        if _refused_credentials(exc):
            raise SystemExit(f"lipsync: NATS at {redact_url(url)} refused the credentials ({why}): "
                             f"{_CREDENTIALS_HINT}") from None
        raise SystemExit(f"lipsync: cannot reach NATS at {redact_url(url)} ({why}): "
                         "is lipsyncd running? (--nats to point elsewhere)") from None


async def _request(url: str, subject: str, body: dict[str, Any] | bytes, timeout: float,
                   cfg: NatsSection) -> Any:
    nc = await _connect(url, cfg)
    try:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        try:
            msg = await nc.request(subject, data, timeout=timeout)
        except Exception as exc:
            raise SystemExit(f"lipsync: no reply on {subject} within {timeout}s ({type(exc).__name__})") from None
        try:
            return json.loads(msg.data)
        except ValueError:
            return msg.data.decode(errors="replace")
    finally:
        await nc.close()


def cmd_schema(args, settings) -> int:
    from schemas import all_json_schemas

    print(json.dumps(all_json_schemas(), indent=2))
    return 0


def cmd_start(args, settings) -> int:
    body: dict[str, Any] = {"v": 1, "session_id": args.session_id, "audio": {"sample_rate": args.rate}}
    if args.url:
        body["idle_video_url"] = args.url
    else:
        body["avatar_id"] = args.avatar
    if args.room:
        body["livekit"] = {"room": args.room, **({"identity": args.identity} if args.identity else {})}
    if args.fps:
        body["video"] = {"fps": args.fps}
    reply = asyncio.run(_request(_nats_url(settings, args.nats), f"{settings.nats.subject_prefix}.session.start",
                                 body, args.timeout, settings.nats))
    print(json.dumps(reply, indent=2))
    return 0 if isinstance(reply, dict) and reply.get("ok") else 1


def cmd_stop(args, settings) -> int:
    reply = asyncio.run(_request(_nats_url(settings, args.nats), f"{settings.nats.subject_prefix}.session.stop",
                                 {"v": 1, "session_id": args.session_id}, args.timeout, settings.nats))
    print(json.dumps(reply, indent=2))
    return 0 if isinstance(reply, dict) and reply.get("ok") else 1


def cmd_control(args, settings) -> int:
    reply = asyncio.run(_request(_nats_url(settings, args.nats),
                                 f"{settings.nats.subject_prefix}.control.{args.session_id}",
                                 {"op": args.op}, args.timeout, settings.nats))
    print(json.dumps(reply))
    return 0 if isinstance(reply, dict) and reply.get("ok") else 1


def cmd_status(args, settings) -> int:
    reply = asyncio.run(_request(_nats_url(settings, args.nats), f"{settings.nats.subject_prefix}.status",
                                 b"", args.timeout, settings.nats))
    print(json.dumps(reply, indent=2))
    return 0


async def _until_signal(work, signals: tuple[int, ...], code: int) -> int:
    """Await a command's ``work``; any of ``signals`` cancels it wherever it waits and
    gives ``code``. Through the loop's own handler, which wakes the loop whichever thread
    the signal lands on: asyncio.run's Ctrl-C handler (signal.signal) reaches a loop idle
    in its poll only when the signal interrupts that poll, else when something else wakes
    it (seconds, when no message comes). asyncio.run's handler still covers the moment
    before this one is in place (KeyboardInterrupt)."""
    loop, main = asyncio.get_running_loop(), asyncio.current_task()
    for sig in signals:
        loop.add_signal_handler(sig, main.cancel)
    try:
        return await work
    except asyncio.CancelledError:
        return code


def cmd_events(args, settings) -> int:
    """Print events until --until, --timeout or Ctrl-C. When NATS goes away (with the
    embedded server: the daemon stopped), say so on stderr and exit 1, or with --follow
    wait for it to come back and go on printing."""
    import nats

    from daemon.bus import auth_options

    url = _nats_url(settings, args.nats)
    prefix = settings.nats.subject_prefix

    def note(text: str) -> None:
        print(f"lipsync events: {text}", file=sys.stderr, flush=True)

    async def run() -> int:
        done = asyncio.Event()  # --until seen
        closed = asyncio.Event()  # the connection is gone for good (no --follow)

        async def on_msg(msg) -> None:
            text = msg.data.decode(errors="replace")
            print(f"{msg.subject} {text}", flush=True)
            if args.until and args.until in text:
                done.set()

        async def on_error(exc: Exception) -> None:
            pass  # the loss itself is said once, by the callbacks below

        async def on_disconnected() -> None:
            if args.follow and not done.is_set():
                note(f"lost NATS at {redact_url(url)} (the daemon stopped?): waiting for it to come back "
                     "(Ctrl-C to quit)")

        async def on_reconnected() -> None:
            note(f"reconnected to NATS at {redact_url(url)}: following again")

        async def on_closed() -> None:
            closed.set()

        options = dict(connect_timeout=2, error_cb=on_error, disconnected_cb=on_disconnected,
                       reconnected_cb=on_reconnected, closed_cb=on_closed)
        if args.follow:
            options.update(allow_reconnect=True, max_reconnect_attempts=-1, reconnect_time_wait=0.5)
        else:
            options.update(allow_reconnect=False, max_reconnect_attempts=0)
        options.update(auth_options(settings.nats))
        waited = False
        while True:
            try:
                nc = await asyncio.wait_for(nats.connect(url, **options), timeout=4)
                break
            except Exception as exc:  # refused, timed out, a bad URL: said once
                if not args.follow or _refused_credentials(exc):
                    why = redact_urls_in(str(exc)) or type(exc).__name__
                    if _refused_credentials(exc):
                        note(f"NATS at {redact_url(url)} refused the credentials ({why}): {_CREDENTIALS_HINT}")
                        return 1
                    note(f"cannot reach NATS at {redact_url(url)} ({why}): is lipsyncd "
                         "running? (--nats to point elsewhere; --follow to wait for it)")
                    return 1
                if not waited:
                    note(f"NATS at {redact_url(url)} is not there yet: waiting for it (Ctrl-C to quit)")
                    waited = True
                await asyncio.sleep(1.0)
        if waited:
            note(f"connected to NATS at {redact_url(url)}")
        await nc.subscribe(f"{prefix}.events.{args.session_id or '>'}", cb=on_msg)
        await nc.subscribe(f"{prefix}.errors", cb=on_msg)
        waits = [asyncio.create_task(done.wait()), asyncio.create_task(closed.wait())]
        try:
            await asyncio.wait(waits, timeout=args.timeout or None, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in waits:
                task.cancel()
            lost = closed.is_set() and not done.is_set()  # before our own close sets it too
            if not nc.is_closed:
                try:  # a close that hangs must not keep Ctrl-C from quitting
                    await asyncio.wait_for(nc.close(), timeout=2)
                except asyncio.TimeoutError:
                    pass
        if lost:
            note(f"the connection to NATS at {redact_url(url)} closed: the daemon stopped (its embedded "
                 "nats-server stops with it) or NATS went away; use --follow to wait for it to come back")
            return 1
        return 0

    try:  # Ctrl-C or SIGTERM: quit, status 0
        return asyncio.run(_until_signal(run(), (signal.SIGINT, signal.SIGTERM), 0))
    except KeyboardInterrupt:
        return 0


def cmd_say(args, settings) -> int:
    if args.dump_chunks:
        return _dump_chunks(args, settings)
    from daemon.producer import SayError, read_speech, say
    from schemas import SUPPORTED_SAMPLE_RATES

    if args.chunk_ms <= 0:
        print(f"lipsync say: --chunk-ms must be positive, not {args.chunk_ms}", file=sys.stderr)
        return 2
    if args.rate is not None and args.rate not in SUPPORTED_SAMPLE_RATES:
        print(f"lipsync say: --rate {args.rate} is not a session rate: one of "
              f"{', '.join(map(str, SUPPORTED_SAMPLE_RATES))}", file=sys.stderr)
        return 2
    wav = Path(args.wav)

    async def run() -> int:
        read_speech(wav)  # a bad file is said before anything connects or is sent
        nc = await _connect(_nats_url(settings, args.nats), settings.nats)
        try:
            return await say(nc, settings.nats.subject_prefix, args.session_id, wav, realtime=args.realtime,
                             chunk_ms=args.chunk_ms, flush=not args.no_flush, rate=args.rate)
        finally:
            await nc.close()

    try:
        return asyncio.run(_until_signal(run(), (signal.SIGINT,), 130))
    except SayError as exc:  # a bad WAV, the session's error event, no playback_finished
        print(f"lipsync say: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _dump_chunks(args, settings) -> int:
    """`lipsync say SID WAV --dump-chunks DIR`: the chunks `say` would send, written to
    files at the session's rate (--rate, or asked from the daemon's status), sent nowhere."""
    from daemon.producer import dump_chunks, read_wav_mono16, session_rate
    from schemas import SUPPORTED_SAMPLE_RATES

    prefix = settings.nats.subject_prefix
    if args.chunk_ms <= 0:
        print(f"lipsync say: --chunk-ms must be positive, not {args.chunk_ms}", file=sys.stderr)
        return 2
    rate = args.rate
    if rate is None:
        url = _nats_url(settings, args.nats)

        async def ask() -> int | None:
            nc = await _connect(url, settings.nats)
            try:
                return await session_rate(nc, prefix, args.session_id)
            finally:
                await nc.close()

        try:
            rate = asyncio.run(ask())
        except SystemExit as exc:
            raise SystemExit(f"{exc}; or give the session's rate with --rate") from None
        if rate is None:
            print(f"lipsync say: session '{args.session_id}' is not live on the daemon at "
                  f"{redact_url(url)}, so its rate is unknown: start it first, or give the rate with --rate",
                  file=sys.stderr)
            return 1
    if rate not in SUPPORTED_SAMPLE_RATES:
        print(f"lipsync say: --rate {rate} is not a session rate: one of "
              f"{', '.join(map(str, SUPPORTED_SAMPLE_RATES))}", file=sys.stderr)
        return 2
    try:
        pcm, _ = read_wav_mono16(Path(args.wav), rate)
    except (OSError, RuntimeError, EOFError, ValueError) as exc:
        print(f"lipsync say: cannot read {args.wav} as a WAV: {exc}", file=sys.stderr)
        return 1
    if not len(pcm):
        print(f"lipsync say: {args.wav} holds no samples", file=sys.stderr)
        return 1
    try:
        paths = dump_chunks(pcm, rate, args.chunk_ms, Path(args.dump_chunks))
    except OSError as exc:  # the folder holds chunks already, or cannot be written
        print(f"lipsync say: --dump-chunks: {exc}", file=sys.stderr)
        return 1
    folder = Path(args.dump_chunks)
    print(f"wrote {len(paths)} chunks of {args.chunk_ms} ms ({paths[0].stat().st_size} bytes, the last "
          f"{paths[-1].stat().st_size}) of {rate} Hz s16le mono to {folder}/{paths[0].name} .. "
          f"{paths[-1].name}; nothing was sent. Send them in order, then flush:")
    print(f"  i=0; for f in {folder}/chunk*.pcm; do nats pub {prefix}.audio.{args.session_id} "
          f"--header Lipsync-Seq:$i --force-stdin --no-templates < \"$f\"; i=$((i+1)); done; "
          f"nats req {prefix}.control.{args.session_id} '{{\"op\":\"flush\"}}'")
    return 0


def cmd_models(args, settings) -> int:
    from musetalk import weights

    model_dir = Path(args.dir) if args.dir else settings.model.dir
    only = [k.strip() for k in args.only.split(",")] if args.only else None
    try:
        for key in only or ():
            weights.model_file(key)
    except KeyError as exc:  # the message lists the known keys
        print(f"lipsync models: --only: {exc.args[0]}", file=sys.stderr)
        return 2
    if args.action == "download":
        try:
            weights.download(model_dir, only=only, progress=True)
        except (weights.DownloadError, weights.ModelFileError) as exc:
            # Said in a few lines (what failed, what is missing, how to go on), not as
            # the HTTP stack's traceback.
            print(f"lipsync models download: {exc}", file=sys.stderr)
            return 1
    missing = 0
    for st in weights.check(model_dir):
        if only and st.file.key not in only:
            continue
        mark = "ok " if st.ok else ("-- " if not st.file.required else "!! ")
        line = f"{mark}{st.file.local_path:55s} {st.detail}"
        if not st.ok:
            line += f"  ({st.file.licence}; fix: {st.fix})"
        print(line)
        missing += int(st.file.required and not st.ok)
    if missing:
        print(f"{missing} required file(s) missing or bad: run `lipsync models download --dir {model_dir}`")
    return 1 if missing else 0


def cmd_render(args, settings) -> int:
    from daemon.demo import download_command, weights_present

    models_dir = Path(args.models) if args.models else settings.model.dir
    if args.random_weights is None and not weights_present(models_dir):
        print(f"lipsync render: MuseTalk weights are not in {models_dir}/. For real lip-sync run: "
              f"{download_command(models_dir)} (or try the pipeline with --random-weights tiny: "
              "the mouth is noise)", file=sys.stderr)
        return 1
    from musetalk.render import render_offline

    cfg = settings.model
    try:
        render_offline(
            Path(args.video), Path(args.audio), Path(args.out), models_dir=models_dir,
            device=args.device or cfg.device, dtype=cfg.dtype, random_weights=args.random_weights,
            landmarks=cfg.landmarks, extra_margin=cfg.extra_margin, parsing_mode=cfg.parsing_mode,
        )
    except (ValueError, OSError) as exc:  # a bad input file, no face in the video, ...
        print(f"lipsync render: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {args.out}")
    return 0


def cmd_bench(args, settings) -> int:
    from musetalk.bench import main as bench_main

    # The benchmark's parser takes its program name from sys.argv[0]: its usage and
    # --help then read "lipsync bench", not "lipsync" (or "cli.py" under python -m).
    argv0, sys.argv[0] = sys.argv[0], "lipsync bench"
    try:
        bench_main(args.bench_args)  # the benchmark's own options (`lipsync bench --help`)
    except (RuntimeError, ValueError) as exc:  # no CUDA, a bad dtype, out of memory: one line
        hint = ""
        if "CUDA is not available" in str(exc):
            hint = " (without a GPU, time the tiny models: lipsync bench --device cpu --size tiny)"
        print(f"lipsync bench: {exc}{hint}", file=sys.stderr)
        return 1
    finally:
        sys.argv[0] = argv0
    return 0


def cmd_demo(args, settings) -> int:
    from daemon.demo import run_demo

    return run_demo(settings, Path(args.wav) if args.wav else None, Path(args.out) if args.out else None)


def cmd_loadtest(args, settings) -> int:
    from daemon.loadtest import LoadtestOptions, Slo, run_loadtest

    sessions = None
    if args.sessions is not None:
        try:
            sessions = tuple(int(n) for n in args.sessions.split(","))
        except ValueError:
            print(f"lipsync loadtest: --sessions {args.sessions!r} must be comma-separated positive "
                  "integers, like 1,4,8", file=sys.stderr)
            return 2
    options = LoadtestOptions(
        sessions=sessions, find_capacity=args.find_capacity, start=args.start, step=args.step,
        max_sessions=args.max_sessions, seconds=args.seconds, warmup_s=args.warmup_s,
        chunk_ms=args.chunk_ms, fps=args.fps, sink=args.sink, rate=args.rate,
        wav=Path(args.wav) if args.wav else None, voiced_only=args.voiced_only,
        slo=Slo(generated_pct=args.slo_generated_pct, latency_p95_ms=args.slo_latency_ms),
        json_path=Path(args.json) if args.json else None, stall_dump_ms=args.stall_dump_ms,
        reference_flow=Path(args.reference_flow) if args.reference_flow else None,
    )
    return run_loadtest(settings, options)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lipsync", description="Tools for the lipsyncd lip-sync daemon")
    p.add_argument("--config", help="config file (default: $LIPSYNC_CONFIG or ./config.toml)")
    sub = p.add_subparsers(dest="command", required=True)

    def nats_opts(sp: argparse.ArgumentParser, timeout: float = 60.0) -> None:
        sp.add_argument("--nats", help="NATS URL (default: from the config)")
        sp.add_argument("--timeout", type=float, default=timeout, help="seconds to wait for a reply")

    sp = sub.add_parser("schema", help="print the JSON Schema of every message")
    sp.set_defaults(fn=cmd_schema)

    sp = sub.add_parser("start", help="start a session (request/reply)")
    sp.add_argument("session_id")
    sp.add_argument("--avatar", default="demo", help="avatar id (default: demo)")
    sp.add_argument("--url", help="idle video URL instead of an avatar id")
    sp.add_argument("--room", help="LiveKit room")
    sp.add_argument("--identity", help="LiveKit identity")
    sp.add_argument("--rate", type=int, default=16000, help="sample rate of the audio you will send")
    sp.add_argument("--fps", type=int)
    nats_opts(sp)
    sp.set_defaults(fn=cmd_start)

    sp = sub.add_parser("stop", help="stop a session")
    sp.add_argument("session_id")
    nats_opts(sp, 10.0)
    sp.set_defaults(fn=cmd_stop)

    sp = sub.add_parser("control", help="flush (end of utterance) or clear (interrupt)")
    sp.add_argument("session_id")
    sp.add_argument("op", choices=["flush", "clear"])
    nats_opts(sp, 5.0)
    sp.set_defaults(fn=cmd_control)

    sp = sub.add_parser("status", help="the daemon's sessions, capacity and device")
    nats_opts(sp, 5.0)
    sp.set_defaults(fn=cmd_status)

    sp = sub.add_parser("events", help="print events (all sessions, or one)")
    sp.add_argument("session_id", nargs="?")
    sp.add_argument("--until", help="exit after an event containing this text (e.g. stopped)")
    sp.add_argument("--nats")
    sp.add_argument("--timeout", type=float, default=0.0, help="exit after this many seconds (0: never)")
    sp.add_argument("--follow", action="store_true", help="when NATS goes away (the daemon stopped or "
                    "restarts), wait for it and go on, instead of exiting with status 1")
    sp.set_defaults(fn=cmd_events)

    sp = sub.add_parser("say", help="stream a WAV into a session as TTS-like PCM chunks")
    sp.add_argument("session_id")
    sp.add_argument("wav")
    sp.add_argument("--realtime", action="store_true", help="pace chunks at real time (like a live TTS)")
    sp.add_argument("--chunk-ms", type=int, default=40)
    sp.add_argument("--rate", type=int, help="resample to this rate before sending (default: the "
                    "session's own rate, asked from the daemon)")
    sp.add_argument("--no-flush", action="store_true", help="do not send flush at the end")
    sp.add_argument("--dump-chunks", metavar="DIR", help="send nothing: write the chunks it would send "
                    "as DIR/chunk0000.pcm, ... (s16le mono at the session's rate: --rate, or asked "
                    "from the daemon), the bodies for `nats pub`")
    nats_opts(sp)
    sp.set_defaults(fn=cmd_say)

    sp = sub.add_parser("models", help="download or check the model weights")
    sp.add_argument("action", choices=["download", "check"])
    sp.add_argument("--dir", help="models dir (default: model.dir)")
    sp.add_argument("--only", help="comma-separated file keys (see `lipsync models check`)")
    sp.set_defaults(fn=cmd_models)

    sp = sub.add_parser("render", help="offline: idle video + speech WAV -> lip-synced MP4")
    sp.add_argument("--video", required=True)
    sp.add_argument("--audio", required=True)
    sp.add_argument("--out", required=True)
    sp.add_argument("--models", help="models dir (default: model.dir)")
    sp.add_argument("--device")
    sp.add_argument("--random-weights", choices=["tiny", "full"], help="development: random weights")
    sp.set_defaults(fn=cmd_render)

    sp = sub.add_parser("bench", help="GPU benchmark of the engine step, or with --reference-flow of "
                        "MuseTalk's own realtime flow (full-size random weights)", add_help=False)
    # Its options are musetalk.bench's own (--device, --dtypes, --batch-sizes, --compile,
    # --size, --json, --reference-flow --frames ...): passed through as they are.
    sp.set_defaults(fn=cmd_bench)

    sp = sub.add_parser("loadtest", help="capacity: N sessions speaking at once, as a user sees them")
    sp.add_argument("--sessions", help="comma-separated session counts (default 1,4,8; with "
                    "--find-capacity: the counts to try, in order)")
    sp.add_argument("--find-capacity", action="store_true", help="raise the session count until the "
                    "SLO fails (--start, --start + --step, ... unless --sessions is given); report the "
                    "last count that met it")
    sp.add_argument("--start", type=int, default=1, help="--find-capacity: first session count")
    sp.add_argument("--step", type=int, default=4, help="--find-capacity: sessions added per round")
    sp.add_argument("--max-sessions", type=int, default=64, help="--find-capacity: stop after this count")
    sp.add_argument("--seconds", type=float, default=60.0, help="measured speech per round, per session")
    sp.add_argument("--warmup-s", type=float, default=5.0, help="speech before the measured seconds, "
                    "left out of every figure")
    sp.add_argument("--chunk-ms", type=int, default=40, help="producers' PCM chunk length")
    sp.add_argument("--fps", type=int, help="session frame rate (default: video.fps on CUDA, 10 on the CPU)")
    sp.add_argument("--sink", choices=["livekit-local", "none"], default="livekit-local",
                    help="livekit-local: through the real LiveKit sources (no room); none: dropped")
    sp.add_argument("--rate", type=int, default=16000, help="sample rate the producers send")
    sp.add_argument("--wav", help="speech WAV, looped (default: the bundled sample)")
    sp.add_argument("--voiced-only", action="store_true",
                    help="stream the speech without its silent frames, so that every frame of every "
                         "session needs the model (sessions x fps generated frames/s)")
    sp.add_argument("--slo-generated-pct", type=float, default=99.0,
                    help="SLO: least share of needed frames generated in time, per session")
    sp.add_argument("--slo-latency-ms", type=float, default=180.0,
                    help="SLO: most p95 latency of generated frames, per session")
    sp.add_argument("--json", help="also write the report here")
    sp.add_argument("--reference-flow", metavar="JSON",
                    help="the report of `lipsync bench --reference-flow --json JSON` (best on this card, "
                         "just before): each row's generated frames shown in time as a multiple of its frames/s")
    sp.add_argument("--stall-dump-ms", type=float, default=0.0,
                    help="when the event loop stalls this long, record every thread's stack "
                         "into the row's stall_dumps; 0 = off")
    sp.set_defaults(fn=cmd_loadtest)

    sp = sub.add_parser("demo", help="the whole loop on this machine: daemon + demo avatar + speech -> MP4")
    sp.add_argument("--wav", help="speech WAV (default: the bundled sample)")
    sp.add_argument("--out", help="copy the recording here")
    sp.set_defaults(fn=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    trace_fatal_signals()
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command == "bench":
        args.bench_args = extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        print(f"lipsync: {exc}", file=sys.stderr)
        return 2
    return args.fn(args, settings)


if __name__ == "__main__":
    sys.exit(main())
