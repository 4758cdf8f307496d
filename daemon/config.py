"""One typed config object, loaded once.

Sources, highest priority first: environment (``LIPSYNC_<SECTION>__<FIELD>``), the TOML
file (``--config``, ``$LIPSYNC_CONFIG`` or ``./config.toml``), the defaults below. Every
field is documented in ``config.toml`` at the repository root. Secrets are ``SecretStr``
(never printed) and may also be read from files named in the config.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

ASSETS_DIR = Path(__file__).parent / "assets"


class _Section(BaseModel):
    # A misspelled field is an error naming it, not a setting silently ignored.
    model_config = ConfigDict(extra="forbid")


class DaemonSection(_Section):
    state_dir: Path = Path("state")
    max_sessions: int = Field(16, ge=1)
    # Frames/s the GPU sustains, for admission; 0 = the figure measured at start.
    capacity_fps: float = 0.0
    # Share of the time a session is expected to speak (1.0: any session may speak
    # continuously, so each counts its full fps against the capacity).
    speech_duty: float = 1.0
    shutdown_timeout_s: float = Field(10.0, gt=0)
    drain_utterances_s: float = Field(5.0, ge=0)
    # A session start (avatar lookup, fetch, decode, preparation) that takes longer fails
    # with an error instead of leaving the producer waiting.
    start_timeout_s: float = Field(120.0, gt=0)
    # How long a thread may hold the GIL while another waits (Python's default is 5 ms):
    # the generation worker shares it with the event loop (the edge's, or the GPU-server
    # process's), and each hand-off it waits for delays a round or a launch by up to this much.
    gil_switch_ms: float = Field(1.0, gt=0, le=100)
    # After start-up, move every object made so far (the model, the avatars' arrays,
    # the imported modules) out of the garbage collector's reach (``gc.freeze``), so that
    # a full collection walks only what sessions allocate since: each collection holds
    # the GIL, stopping every session's frame loop and the generation worker at once.
    gc_freeze: bool = True
    # Run the model in its own process (daemon.gpu_server): the GPU work and its Python
    # no longer share this process's GIL with the sessions' frame clocks, and a crash of
    # it is survived (sessions show idle frames while it restarts). "auto": when the
    # model runs on CUDA (measured on an H200: event-loop lag p99 under 2 ms at 24
    # sessions, against 938 late ticks at 16 in one process); in-process on a CPU.
    gpu_process: bool | Literal["auto"] = "auto"
    # Edge processes (NATS, sessions, frame clocks, publishers) beside one GPU server:
    # with more than one, ``lipsyncd`` supervises a GPU-server process and this many edges
    # (daemon.supervisor), so that a LiveKit reconnect storm or a crash in one edge cannot
    # delay or end the sessions of another. 1: one process (gpu_process decides where the
    # model runs).
    edge_processes: int = Field(1, ge=1, le=32)
    # Set by lipsyncd for its edge processes, not in a config file: the shared GPU
    # server's socket, and the edge's name and number (1..edge_processes).
    gpu_socket: Path | None = None
    edge_name: str = ""
    edge_index: int = Field(0, ge=0)

    @field_validator("capacity_fps")
    @classmethod
    def _capacity_is_a_rate(cls, v: float) -> float:
        if not math.isfinite(v) or v < 0:
            raise ValueError(f"daemon.capacity_fps {v!r} must be a positive number of frames/s the GPU "
                             "sustains (e.g. 300), or 0 to use the figure measured at start")
        return v

    @field_validator("speech_duty")
    @classmethod
    def _duty_is_a_share(cls, v: float) -> float:
        if not math.isfinite(v) or not 0 < v <= 1:
            raise ValueError(f"daemon.speech_duty {v!r} must be above 0 and at most 1: the share of the "
                             "time a session speaks (1.0 = continuously; 0.5 = half the time)")
        return v


class NatsSection(_Section):
    url: str = "embedded"
    embedded_host: str = "127.0.0.1"
    embedded_port: int = Field(4222, ge=0, le=65535)
    subject_prefix: str = "lipsync"
    queue_group: str = "lipsync"
    service_name: str = "lipsync"
    user: str | None = None
    password: SecretStr | None = None
    token: SecretStr | None = None
    creds_file: Path | None = None
    nkey_seed_file: Path | None = None
    tls_ca_file: Path | None = None
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    connect_timeout_s: float = 2.0
    # Liveness: a PING every ping_interval_s; a server that leaves more than
    # max_outstanding_pings unanswered (frozen, or a half-open TCP link) is given up and
    # reconnected to, within about ping_interval_s x (max_outstanding_pings + 1).
    ping_interval_s: float = Field(5.0, gt=0)
    max_outstanding_pings: int = Field(2, ge=1)
    # Between reconnect attempts: reconnect_time_wait_s plus a random 0..reconnect_jitter_s,
    # so that daemons that lost the same server do not all come back in step.
    reconnect_time_wait_s: float = Field(1.0, ge=0)
    reconnect_jitter_s: float = Field(0.5, ge=0)
    max_audio_message_bytes: int = Field(1 << 20, ge=1024)
    report_unknown_sessions: bool = True
    registry_bucket: str | None = None
    registry_ttl_s: float = Field(30.0, ge=3.0)

    @field_validator("subject_prefix")
    @classmethod
    def _prefix_is_a_token(cls, v: str) -> str:
        if not v or any(c in v for c in " *>") or v.startswith(".") or v.endswith("."):
            raise ValueError(f"nats.subject_prefix {v!r} must be a plain subject like 'lipsync'")
        return v


class FirestoreSection(_Section):
    project: str | None = None
    database: str = "(default)"
    collection: str = "avatars"
    field: str = "idle_video_url"
    credentials_file: Path | None = None
    timeout_s: float = 5.0
    # When Firestore cannot be reached, an avatar looked up within this many seconds is
    # started with the URL it had then (0: never; every start then needs Firestore).
    stale_ttl_s: float = Field(86400.0, ge=0)


class AvatarEntry(_Section):
    idle_video_url: str


class FetchSection(_Section):
    allow_file_urls: bool = False
    allow_http: bool = False
    timeout_s: float = 30.0
    max_bytes: int = Field(200 * 1024 * 1024, ge=1024)
    max_redirects: int = Field(3, ge=0)
    # Downloaded videos kept under <state_dir>/downloads, by content: the least recently
    # used go first beyond this size (a video being downloaded or just used is kept).
    cache_max_bytes: int = Field(20 * 1024**3, ge=0)
    min_video_s: float = 0.2
    max_video_s: float = 120.0
    max_frames_in_memory: int = 3000
    # All decoded idle videos together (RGB + I420 in host memory): a start that would
    # pass it is refused with at_capacity (8 GiB: e.g. 24 avatars of 300 frames at 512x512).
    decoded_max_bytes: int = Field(8 * 1024**3, ge=0)
    # Decoded videos no session shows any more are kept, the most recently used first, up
    # to this many bytes (within decoded_max_bytes): the next start of such an avatar skips
    # the decode (about a second). 0: drop a video with its last session.
    decoded_keep_bytes: int = Field(2 * 1024**3, ge=0)
    # Host names or networks (CIDR, or one address) that may be fetched although they
    # resolve to loopback, private, link-local or other non-public addresses.
    allow_private_hosts: list[str] = Field(default_factory=list)
    # Decoding runs in child processes: at most this many at once, each killed past
    # decode_timeout_s and limited to decode_memory_mb of address space.
    decode_workers: int = Field(2, ge=1, le=64)
    decode_timeout_s: float = Field(60.0, gt=0)
    decode_memory_mb: int = Field(4096, ge=64)

    @field_validator("allow_private_hosts")
    @classmethod
    def _hosts_or_networks(cls, v: list[str]) -> list[str]:
        cleaned = []
        for entry in v:
            item = entry.strip().lower().rstrip(".")
            if "/" in item:
                try:
                    ipaddress.ip_network(item, strict=False)
                except ValueError:
                    raise ValueError(f"fetch.allow_private_hosts entry {entry!r} is not a network; "
                                     "use a CIDR like '10.0.0.0/8', an address or a host name") from None
            elif not item or (any(c in item for c in " :@?#") and not _is_ip(item)):
                raise ValueError(f"fetch.allow_private_hosts entry {entry!r} must be a host name "
                                 "(no scheme or port), an address or a CIDR network")
            cleaned.append(item)
        return cleaned


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


class VideoSection(_Section):
    fps: int = Field(25, ge=1, le=60)
    auto_fps: bool = True
    max_width: int = 1920
    max_height: int = 1920


class AudioSection(_Section):
    max_buffer_s: float = Field(60.0, gt=0)


class LiveKitSection(_Section):
    url: str | None = None
    api_key: SecretStr | None = None
    api_secret: SecretStr | None = None
    api_key_file: Path | None = None
    api_secret_file: Path | None = None
    token_ttl_s: int = Field(3600, ge=60)
    default_identity_prefix: str = "avatar-"
    reconnect_max_backoff_s: float = 10.0
    connect_timeout_s: float = 10.0
    # Which rooms and identities a start may ask for (full-match regular expressions;
    # unset: any). Anyone who can publish a start on NATS picks them otherwise.
    room_pattern: str | None = None
    identity_pattern: str | None = None
    # Every start brings its own join token (livekit.token, minted by the orchestrator):
    # the daemon holds no LiveKit key or secret and refuses starts without one.
    tokens_from_orchestrator: bool = False

    @field_validator("room_pattern", "identity_pattern")
    @classmethod
    def _regex(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"not a regular expression: {exc}") from None
        return value

    def key(self) -> SecretStr | None:
        return self.api_key or _read_secret_file(self.api_key_file)

    def secret(self) -> SecretStr | None:
        return self.api_secret or _read_secret_file(self.api_secret_file)

    def credentials(self) -> tuple[SecretStr | None, SecretStr | None, list[str]]:
        """Key and secret, each file read once, and the settings of those not set (each
        named with its environment variable and file); raises ConfigError for a secret
        file that cannot be read."""
        key, secret = self.key(), self.secret()
        missing = [
            f"livekit.{name} (env LIPSYNC_LIVEKIT__{name.upper()}, or livekit.{name}_file)"
            for name, value in (("api_key", key), ("api_secret", secret))
            if value is None or not value.get_secret_value()
        ]
        return key, secret, missing

    def missing_credentials(self) -> list[str]:
        return self.credentials()[2]


class OutputSection(_Section):
    # "auto": LiveKit when livekit.url is set, else a local MP4 per session. "none":
    # frames are counted and dropped (load tests of the model side). "livekit-local":
    # through the real LiveKit sources without joining a room (load tests that include
    # the cost of publishing).
    sink: Literal["auto", "livekit", "livekit-local", "file", "none"] = "auto"
    recordings_dir: Path | None = None
    # A session whose output stays down longer (a LiveKit room not reconnected, a failed
    # file writer) ends itself with publisher_failed; the process and the other sessions
    # go on (the systemd watchdog never waits on a session).
    unhealthy_budget_s: float = Field(30.0, gt=0)


class HttpSection(_Section):
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(9464, ge=0, le=65535)
    # Once listening, write the port bound here (useful with port 0; lipsyncd's edge
    # processes tell it theirs this way).
    port_file: Path | None = None


class LoggingSection(_Section):
    level: str = "INFO"
    format: Literal["json", "console"] = "json"


class ModelSection(_Section):
    enabled: bool = True
    dir: Path = Path("models")
    device: str = "auto"
    dtype: Literal["float16", "bfloat16", "float32"] = "float16"
    random_weights: bool = False
    random_weights_size: Literal["full", "tiny"] = "tiny"
    compile: bool = True
    compile_dynamic: bool = True
    # With compile on CUDA: the audio rounds' graphed whisper encodes through torch.compile
    # (H100: a round of 12 encodes 3.71 -> 2.78 ms, the encode of 24 4.83 -> 2.89 ms).
    audio_compile: bool = True
    # 16: a step of 20 costs more a frame on an H100 or H200, and a longer step is a
    # longer latency budget (config.toml; docs/BENCHMARKS.md, fourteenth session).
    max_batch: int = Field(16, ge=1)
    bucket_step: int = Field(4, ge=1)
    # "demand": a step fills the smallest batch that keeps up with the open sessions at
    # batch_utilization of the GPU (shorter steps, shorter latency); "max": up to max_batch.
    # 0.9: on an H200 22 sessions then run 16-frame steps (p95 <= 168 ms; at 0.85 they
    # took 24-frame steps, p95 194-209 ms on an H100); 20 sessions run 16-frame steps at
    # 0.85 too (p95 178 ms); at 0.8 they took 20 (p95 190 ms) (docs/BENCHMARKS.md, ninth,
    # twelfth and thirteenth sessions).
    batch_sizing: Literal["demand", "max"] = "demand"
    batch_utilization: float = Field(0.9, gt=0, le=1)
    # A step that is not full waits for more frames (up to its batch) while the GPU is
    # still busy with earlier work, and is launched just before the GPU is free: it starts
    # no later, with more frames. Without it a saturated GPU runs what came in during the
    # last step (13.2 frames a step at 24 sessions on an H200, against 16 planned). On an
    # H100 at 24 sessions: 14.5 frames a step instead of 12.4, 524.6 frames/s made
    # instead of 503.2 (docs/BENCHMARKS.md, fourteenth session).
    fill_steps: bool = True
    # How long before the GPU is free such a step is launched anyway, in ms; 0: the
    # bucket's median host launch time (the loadtest's stages, launch_host_ms) plus 4 ms.
    # The device can start once the UNet's work is queued (launch_queue_ms), so a shorter
    # lead lets more frames in; not yet measured on a GPU.
    fill_lead_ms: float = Field(0.0, ge=0, le=100)
    # While the GPU is busy with earlier work, a frame is launched only if a step of this
    # share of its estimate would still end before the frame's tick; else it is dropped
    # (its session shows an idle frame) and the step's time goes to frames that can make
    # it. With the GPU idle the share is 0.75 (a late wake-up must not drop frames).
    # 1.0 by measurement: at 24 sessions on an H100 99.63 and 98.89 % generated in time
    # for the worst session against 96.96 % with 0.75 (docs/BENCHMARKS.md, 17th session).
    busy_drop_fraction: float = Field(1.0, ge=0.5, le=1.5)
    horizon_s: float = Field(1.0, gt=0, le=30)
    # The VAE decode computes only the face rows the blend can show (from
    # decode_crop_row of 256 down; GroupNorm statistics completed by sums cached per
    # avatar frame). "auto": on CUDA, per avatar, once a few frames decoded both ways
    # differ by at most decode_tolerance uint8 levels (mean absolute over the blended box;
    # until then, and where it fails, the whole decode); "full": never; "cropped": every
    # avatar whose blend the rows cover, whatever the difference (benchmarks with random
    # weights, whose upper face moves with the audio as a real model's does not).
    # "auto" by default: measured on an H200 a frame's step 2.40 -> 1.84 ms (16 -> 20
    # sessions; docs/BENCHMARKS.md, "Fifth session").
    decode: Literal["auto", "full", "cropped"] = "auto"
    # Kernel variants of the compiled step (measured by `python -m musetalk.step_bench`,
    # docs/BENCHMARKS.md): fuse_step records the UNet and the decode as one CUDA graph per
    # bucket instead of two; inductor_options are Inductor's own (torch.compile options,
    # e.g. {"freezing": true}), empty for its defaults.
    fuse_step: bool = False
    # "transposed": the UNet's and the decoder's upsamplers (nearest 2x, then a 3x3
    # convolution) computed as stride-2 transposed convolutions of their input, which
    # write the upsampled map themselves: the same function with 4/9 of those
    # convolutions' FLOPs (musetalk/subpixel.py); a step 3.6-4.7 % faster than
    # "subpixel" on an H200 (16 and 20 frames, thirteenth session). "subpixel": the same
    # function as one 2x2 convolution and a pass interleaving its four phases; "nearest":
    # as the models define them.
    upsample: Literal["nearest", "subpixel", "transposed"] = "transposed"
    inductor_options: dict[str, bool | int | str] = Field(default_factory=dict)
    decode_crop_row: int = Field(96, ge=0, le=255)
    # A second crop plan from this row (0: none), above decode_crop_row: avatars whose
    # blend starts at or below it (and whose validation passes for it too) decode fewer
    # rows; a step uses it when every avatar in it has it. Costs a compile per bucket.
    # 108: the demo avatar's and the loadtest's (docs/BENCHMARKS.md, sixteenth session).
    decode_crop_row_high: int = Field(108, ge=0, le=255)
    decode_tolerance: float = Field(1.0, gt=0, le=255)
    extra_margin: int = 10
    parsing_mode: Literal["jaw", "raw"] = "jaw"
    landmarks: Literal["auto", "onnx", "opencv"] = "auto"
    blend_frames: int = Field(3, ge=0)
    lookahead_frames: int = Field(0, ge=0)
    playout_delay_frames: int | None = Field(None, ge=1, le=100)
    processing_budget_ms: float | None = Field(None, gt=0, le=2000)
    # The measured budget (processing_budget_ms unset) adds, once the open sessions need
    # the largest batch (max_batch), the wait for the steps queued before a frame (M/D/1
    # at the planned load), up to this total; never below the budget's other terms.
    # Unset: no such term. 88: on an H100 at 24
    # sessions a fixed 88 ms budget kept every session >= 99.78 % in time (p95 175.6 ms)
    # where the terms alone (83.6-85.0 ms) left the worst at 98.59 %: fuller steps, 15.79
    # frames against 14.7 (docs/BENCHMARKS.md, nineteenth session). At 25 fps a frame's
    # p95 latency is then about 80 ms of audio context + 88 + 8.
    processing_budget_most_ms: float | None = Field(88.0, gt=0, le=2000)
    audio_window_s: float | None = Field(None, ge=1.0, le=30.0)
    # Prepared avatars kept under <state_dir>/avatars: the least recently used go first
    # beyond this size (never one in use).
    avatar_cache_max_bytes: int = Field(20 * 1024**3, ge=0)
    # Audio rounds at most this often: chunks of many sessions share one encoder batch.
    audio_round_ms: float = Field(20.0, ge=0, le=200)
    auto_flush_s: float = Field(2.0, gt=0)

    @model_validator(mode="after")
    def _crop_rows_in_order(self) -> ModelSection:
        if self.decode_crop_row_high and self.decode_crop_row_high <= self.decode_crop_row:
            raise ValueError(f"model.decode_crop_row_high ({self.decode_crop_row_high}) must be above "
                             f"model.decode_crop_row ({self.decode_crop_row}), or 0 for no second plan")
        return self


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="LIPSYNC_",
        env_nested_delimiter="__",
        extra="forbid",
        toml_file=None,
    )

    daemon: DaemonSection = DaemonSection()
    nats: NatsSection = NatsSection()
    firestore: FirestoreSection = FirestoreSection()
    avatars: dict[str, AvatarEntry] = Field(
        default_factory=lambda: {"demo": AvatarEntry(idle_video_url="asset:demo.mp4")}
    )
    fetch: FetchSection = FetchSection()
    video: VideoSection = VideoSection()
    audio: AudioSection = AudioSection()
    livekit: LiveKitSection = LiveKitSection()
    output: OutputSection = OutputSection()
    http: HttpSection = HttpSection()
    logging: LoggingSection = LoggingSection()
    model: ModelSection = ModelSection()

    _toml_path: Path | None = None

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        path = _CONFIG_PATH_HOLDER.get("path")
        if path is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=path))
        return tuple(sources)

    def sink_kind(self) -> Literal["livekit", "livekit-local", "file", "none"]:
        if self.output.sink == "auto":
            return "livekit" if self.livekit.url else "file"
        return self.output.sink

    def recordings_dir(self) -> Path:
        return self.output.recordings_dir or self.daemon.state_dir / "recordings"

    def gpu_process_problem(self) -> str | None:
        """Why the model cannot run in a process of its own here, in words that say what to
        change; None when it can or is not asked to. The shared-memory rings between the
        processes need a CPU with total store order (x86-64)."""
        from daemon import shm_ring

        if shm_ring.ORDERED_STORES:
            return None
        d = self.daemon
        if d.gpu_process is True or d.edge_processes > 1 or d.gpu_socket is not None:
            import platform

            return (f"daemon.gpu_process = true and daemon.edge_processes > 1 need an x86-64 CPU (the "
                    f"processes' shared-memory rings rely on its store order); this one is "
                    f"{platform.machine()}: set daemon.gpu_process = false and daemon.edge_processes = 1 "
                    f"(the model then runs in the daemon's process)")
        return None

    def livekit_problem(self) -> str | None:
        """Why sessions could not publish to LiveKit with this config, in words that say
        what to change; None when the output is not LiveKit or it has what it needs.
        Asked at start-up, so that a daemon missing its credentials does not come up
        "ready" and then fail every session."""
        if self.sink_kind() != "livekit":
            return None
        lk = self.livekit
        if not lk.url:
            return ("output.sink is 'livekit' but livekit.url is not set: set livekit.url (env "
                    "LIPSYNC_LIVEKIT__URL), or output.sink = 'auto' to record each session to an MP4")
        if lk.tokens_from_orchestrator:
            return None  # no credentials here: each start brings its token
        try:
            missing = lk.missing_credentials()
        except ConfigError as exc:  # a secret file that cannot be read
            return f"livekit: {exc}"
        if not missing:
            return None
        from daemon.log import redact_url

        return (f"livekit.url is set ({redact_url(lk.url)}), so sessions publish to LiveKit, but its credentials "
                f"are not: set {' and '.join(missing)}; or unset livekit.url to record each session "
                "to an MP4")

    def public_summary(self) -> dict[str, Any]:
        """The config as it may be logged: SecretStr fields print as '**********'."""
        return self.model_dump(mode="json")


_CONFIG_PATH_HOLDER: dict[str, Path | None] = {}


def _read_secret_file(path: Path | None) -> SecretStr | None:
    if path is None:
        return None
    try:
        return SecretStr(path.read_text().strip())
    except OSError as exc:
        raise ConfigError(f"cannot read secret file {path}: {exc.strerror}") from None


class ConfigError(Exception):
    pass


def default_config_path() -> Path | None:
    env = os.environ.get("LIPSYNC_CONFIG")
    if env:
        return Path(env)
    local = Path("config.toml")
    return local if local.exists() else None


def load_settings(path: Path | str | None = None, **overrides: Any) -> Settings:
    """Load the settings once. ``path=None`` uses ``$LIPSYNC_CONFIG`` or ./config.toml."""
    resolved = Path(path) if path is not None else default_config_path()
    if resolved is not None and not resolved.exists():
        raise ConfigError(f"config file {resolved} does not exist (set --config or LIPSYNC_CONFIG)")
    _CONFIG_PATH_HOLDER["path"] = resolved
    try:
        return Settings(**overrides)
    except Exception as exc:  # pydantic ValidationError: name the file
        raise ConfigError(f"invalid configuration ({resolved or 'defaults'}): {exc}") from None
    finally:
        _CONFIG_PATH_HOLDER.pop("path", None)


def uses_gpu_process(s: Settings) -> bool:
    """``daemon.gpu_process`` resolved: "auto" runs the model in its own process where it
    runs on CUDA (a CPU box keeps it in the edge's process), on an x86-64 CPU."""
    if s.daemon.gpu_process != "auto":
        return bool(s.daemon.gpu_process)
    if not s.model.enabled:
        return False
    from daemon import shm_ring

    if not shm_ring.ORDERED_STORES:  # the rings need x86-64 (Settings.gpu_process_problem)
        return False
    from musetalk.models import resolve_device

    return resolve_device(s.model.device).type == "cuda"
