"""Streaming MuseTalk audio tokens for many sessions at once, kept on one device.

``musetalk.audio.StreamingAudioFeatures`` (window 30 s) computes each session's log-mel
on the host, copies a 0.96 MB mel to the GPU per encode and the features back per
session; with many sessions that host work, not the GPU, is the capacity wall
(docs/AUDIO.md). ``GpuAudioStreams`` gives the same tokens with only the new samples
crossing to the device:

- ``push`` stages float32 16 kHz samples on the host (no GPU work, any thread);
- ``round`` (the GPU worker thread) uploads every slot's staged samples with one copy
  from a reused pinned buffer, appends them to each slot's 30 s segment on the device,
  computes the log-mel there (``log_mel_device``) for every slot whose next frames became
  computable, runs one batched encoder call, and writes each new frame's [50, 384]
  tokens into the ring ``tokens[slot, frame % ring_frames]``. Nothing goes back to the
  host and nothing waits for the device.

Semantics are StreamingAudioFeatures' with ``window_s=30``: frame f is computed once the
audio through the end of its last feature frame (plus ``lookahead_frames``) has arrived,
from the current segment zero-padded to 30 s (what the reference feeds its last segment);
a frame whose ten feature frames straddle a segment boundary takes the previous
segment's features from that segment's final, complete encoding (a small tail of it is
kept per slot). At a flush the features after floor(samples / 320) are zero, as offline.

The ring: a slot never runs more than ``ring_frames`` frames ahead of what its caller
reported with ``consumed``; past that, ``round`` leaves its further frames for later
rounds and its audio waits, so an unconsumed row is never overwritten. Samples of the
next 30 s segment also stay staged until the slot's frames reach the segment's end
(device memory is one segment per slot).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

import numpy as np
import torch

from musetalk.audio import (
    FEATURE_RATE,
    FEATURES_PER_FRAME,
    HIDDEN_STATES,
    SAMPLES_PER_FEATURE,
    frame_feature_start,
    num_feature_frames,
    num_video_frames,
    padding_frames,
    positional_encoding,
)
from musetalk.types import AUDIO_DIM, AUDIO_TOKENS
from musetalk.whisper import (
    HOP_LENGTH,
    N_FFT,
    SAMPLE_RATE,
    WINDOW_FEATURES,
    WINDOW_MEL_FRAMES,
    WINDOW_SAMPLES,
    WhisperAudioEncoder,
)

log = logging.getLogger(__name__)

# Features of a segment's final encoding kept per slot for frames that straddle into the
# next segment: a frame spans 10, and a slot rolls over only once its next frame starts
# within this many features of the boundary.
TAIL_FEATURES = 2 * FEATURES_PER_FRAME
# The rows an encode's last layer computes come in multiples of this (fewer shapes).
QUERY_ROW_STEP = 16
# Row counts whose encodes are CUDA graphs (captured by ``warm`` for every encoder
# bucket): a 40 ms chunk's frames read 10-14 rows, a segment's end 20-32.
GRAPH_QUERY_ROWS = (16, 32)


@dataclass
class _EncoderGraph:
    """One captured encode: its static inputs (views of shared buffers) and output."""

    graph: torch.cuda.CUDAGraph
    mel: torch.Tensor
    rows: torch.Tensor
    out: torch.Tensor

def encoder_buckets(most: int) -> list[int]:
    """Encoder batch sizes: 1, 2, 4, then every even size up to 32, then steps of at
    least 8 and at most a quarter (40, 48, 56, 64, 80, ...), up to ``most``. A padded
    item costs a whole encode (about 0.2 ms on an H200): with steps of 4 and 8 a round
    of 9-24 encodes ran about 13 % padding, with steps of 2 about 4 %."""
    sizes, b = [], 1
    while b < most:
        sizes.append(b)
        b = b * 2 if b < 4 else b + 2 if b < 32 else b + max(8, b // 4 // 8 * 8)
    sizes.append(b)
    return sizes


# Source of one feature row of a frame's window.
_ZERO, _STATE, _TAIL = 0, 1, 2


def log_mel_device(audio: torch.Tensor, mel_filters_t: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """Whisper's normalized log-mel of [B, 480000] zero-padded segments -> [B, n_mels, 3000].

    As ``WhisperFeatureExtractor``: centered STFT (reflect padding), |.|^2, mel filters
    (``mel_filters_t`` [n_mels, 201]), log10 with floor 1e-10, clamp to (item max - 8),
    (x + 4) / 4; float32 throughout. ``window``: the periodic Hann window of 400.
    """
    return normalize_log_mel(log_spec_device(audio, mel_filters_t, window))


def log_spec_device(audio: torch.Tensor, mel_filters_t: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """The log10 mel power of ``log_mel_device`` before whisper's normalization."""
    spec = torch.stft(
        audio, N_FFT, HOP_LENGTH, window=window, center=True, pad_mode="reflect", return_complex=True
    )
    power = (spec[..., :-1].abs() ** 2).contiguous()
    return torch.clamp(mel_filters_t @ power, min=1e-10).log10()


# log10 of log_mel_device's power floor: every column of a zero-padded segment's silence.
LOG_FLOOR = -10.0
# Columns an incremental log-mel update computes come in powers of two from this (a
# 40 ms chunk changes 6-7 columns of 3000).
COLUMN_STEP = 16


def changed_columns(old: int, new: int) -> tuple[int, int]:
    """The log-mel columns (first, stop) of a 30 s segment whose 400-sample STFT windows
    see the segment's samples ``old`` .. ``new - 1`` (column j's window is samples
    160 j - 200 .. 160 j + 199, reflected at the segment's ends); every other column is
    unchanged when those samples arrive."""
    first = max(0, (old - N_FFT // 2) // HOP_LENGTH)
    stop = min(WINDOW_SAMPLES // HOP_LENGTH, -(-(new + N_FFT // 2) // HOP_LENGTH))
    return first, max(first, stop)


def log_mel_columns(audio: torch.Tensor, rows: torch.Tensor, columns: torch.Tensor, mel_filters_t: torch.Tensor,
                    window: torch.Tensor) -> torch.Tensor:
    """log10 mel power (before whisper's normalization) of some STFT columns of some
    segments: ``audio`` [S, 480000], ``rows`` [n] segment rows, ``columns`` [n, K]
    column indices -> [n, K, n_mels]; each column as ``log_mel_device`` computes it
    (centered 400-sample Hann windows, reflect padding at the segment's ends)."""
    last = audio.shape[1] - 1
    pos = (columns[:, :, None] * HOP_LENGTH - N_FFT // 2
           + torch.arange(N_FFT, device=audio.device)[None, None, :]).abs()
    pos = torch.where(pos > last, 2 * last - pos, pos)
    frames = audio.view(-1)[rows[:, None, None] * audio.shape[1] + pos] * window
    power = torch.fft.rfft(frames, n=N_FFT).abs() ** 2
    return torch.clamp(power @ mel_filters_t.T, min=1e-10).log10()


def normalize_log_mel(log_spec: torch.Tensor) -> torch.Tensor:
    """Whisper's normalization of [B, n_mels, 3000] log10 mel power: clamp to (item max
    - 8), then (x + 4) / 4 (the last steps of ``log_mel_device``)."""
    peak = log_spec.amax(dim=(1, 2), keepdim=True)
    return (torch.maximum(log_spec, peak - 8.0) + 4.0) / 4.0


@dataclass
class _Slot:
    """Host-side bookkeeping of one stream (one utterance at a time)."""

    open: bool = False
    staged: list[np.ndarray] = field(default_factory=list)  # samples not yet on the device
    samples: int = 0  # received in this utterance, staged or uploaded
    segment: int = 0  # index of the 30 s segment held in the device buffer
    fill: int = 0  # samples of that segment on the device
    frames_ready: int = 0
    consumed: int = 0
    ended: bool = False
    tails: list[int] = field(default_factory=lambda: [-1, -1])  # segment whose tail is at parity 0 / 1
    dirty: bool = False  # the device buffer holds samples of a dropped utterance

    def clear(self) -> None:
        self.dirty = self.dirty or self.fill > 0 or self.segment > 0
        self.staged = []
        self.samples = self.segment = self.fill = self.frames_ready = self.consumed = 0
        self.ended = False
        self.tails = [-1, -1]


@dataclass
class _SlotPlan:
    """What one round does for one slot (filled by ``_plan``, executed by ``_launch``)."""

    slot: int
    segment: int  # the device segment after this round's uploads
    first: int = 0
    stop: int = 0  # frames first .. stop - 1 are made
    limit: int | None = None  # features from here on are zero (flushed utterance)
    current: bool = False  # encodes the device segment
    final: bool = False  # encodes the previous segment, complete, before its buffer is reused
    store_current_tail: bool = False
    current_item: int = -1
    final_item: int = -1
    need_lo: int = WINDOW_FEATURES  # features of the device segment the frames read (segment coordinates)
    need_hi: int = 0
    current_start: int = 0  # first feature of the encoded window (short windows)


@dataclass
class _Uploads:
    """The samples of one round: pieces before (pre) and after (post) a segment rollover."""

    zero_before: list[int] = field(default_factory=list)  # dropped utterances: clear first
    pre_parts: list[np.ndarray] = field(default_factory=list)
    pre_delta: list[int] = field(default_factory=list)
    pre_lens: list[int] = field(default_factory=list)
    pre_n: int = 0
    final_rows: list[int] = field(default_factory=list)  # segments encoded once complete
    zero_between: list[int] = field(default_factory=list)  # buffers reused for the next segment
    post_parts: list[np.ndarray] = field(default_factory=list)
    post_delta: list[int] = field(default_factory=list)
    post_lens: list[int] = field(default_factory=list)
    post_n: int = 0
    # Log-mel columns each upload changes (incremental log-mel): (slot, first, stop).
    pre_cols: list[tuple[int, int, int]] = field(default_factory=list)
    post_cols: list[tuple[int, int, int]] = field(default_factory=list)

    @property
    def any_work(self) -> bool:
        return bool(self.pre_n or self.post_n or self.zero_before)


class _HostBuffer:
    """A reused (pinned on CUDA) host staging buffer and its device twin.

    Two of each kind alternate between rounds; before a buffer is refilled, the copy
    that last read it (two rounds ago, long done in practice) is waited for.
    """

    def __init__(self, dtype: torch.dtype, capacity: int, device: torch.device):
        self.dtype = dtype
        self.device = device
        self.cuda = device.type == "cuda"
        self.host = torch.empty(capacity, dtype=dtype, pin_memory=self.cuda)
        self.dev = torch.empty(capacity, dtype=dtype, device=device) if self.cuda else None
        self.event: torch.cuda.Event | None = None

    def fill(self, parts: list[np.ndarray]) -> int:
        n = sum(len(p) for p in parts)
        if self.event is not None:
            self.event.synchronize()
            self.event = None
        if n > self.host.numel():
            capacity = max(n, 2 * self.host.numel())
            self.host = torch.empty(capacity, dtype=self.dtype, pin_memory=self.cuda)
            if self.cuda:
                self.dev = torch.empty(capacity, dtype=self.dtype, device=self.device)
        view = self.host.numpy()
        pos = 0
        for p in parts:
            view[pos : pos + len(p)] = p
            pos += len(p)
        return n

    def upload(self, n: int) -> torch.Tensor:
        if not self.cuda:
            return self.host[:n]
        self.dev[:n].copy_(self.host[:n], non_blocking=True)
        self.event = torch.cuda.Event()
        self.event.record()
        return self.dev[:n]


class GpuAudioStreams:
    """Streaming MuseTalk audio tokens for many sessions at once, on one device.

    One slot per utterance stream: ``open`` -> ``push`` ... ``flush`` -> (next utterance)
    -> ``close``. The worker thread calls ``round()`` once per iteration and reads the
    frames it reports from ``tokens`` (``token_index``) on the same CUDA stream, then
    reports ``consumed`` once the work that reads them is queued. A slot never runs more
    than ``ring_frames`` frames ahead of its consumption. Host methods take a lock, so
    ``push`` may come from another thread than ``round`` (it waits for a round's launches).

    ``tokens``: [max_streams, ring_frames, 50, 384] in the encoder's dtype on its device;
    frame f of a slot is at ``tokens[slot, f % ring_frames]``. Device memory besides it:
    one 30 s float32 segment per slot (1.9 MB) and two 20-feature tails.
    """

    def __init__(
        self,
        encoder: WhisperAudioEncoder,
        fps: int = 25,
        max_streams: int = 64,
        ring_frames: int = 64,
        lookahead_frames: int = 0,
        window_s: float = 30.0,
        batch_buckets: bool | None = None,
        graphs: bool | None = None,
        compile: bool = False,
    ):
        if int(fps) != fps or not 1 <= fps <= FEATURE_RATE:
            raise ValueError(f"fps must be an integer in 1..{FEATURE_RATE}, got {fps}")
        if int(max_streams) != max_streams or max_streams < 1:
            raise ValueError(f"max_streams must be a positive integer, got {max_streams}")
        if int(ring_frames) != ring_frames or ring_frames < 1:
            raise ValueError(f"ring_frames must be a positive integer, got {ring_frames}")
        if int(lookahead_frames) != lookahead_frames or lookahead_frames < 0:
            raise ValueError(f"lookahead_frames must be an integer >= 0, got {lookahead_frames}")
        if encoder.d_model != AUDIO_DIM or encoder.num_hidden_states != HIDDEN_STATES:
            raise ValueError(
                f"MuseTalk needs whisper-tiny's {HIDDEN_STATES} hidden states of width {AUDIO_DIM}; "
                f"this encoder has {encoder.num_hidden_states} of width {encoder.d_model}"
            )
        self.encoder = encoder
        self.device = encoder.device
        self.dtype = encoder.dtype
        self.fps = int(fps)
        self.max_streams = int(max_streams)
        self.ring_frames = int(ring_frames)
        self.lookahead_frames = int(lookahead_frames)
        # The encoder window: 30 s (the reference's own, features equal offline) or a
        # shorter one (a CPU cannot encode 30 s every 40 ms): the recent window_s seconds
        # of the segment with their own positional embeddings, as StreamingAudioFeatures.
        self.window_features = int(round(float(window_s) * FEATURE_RATE))
        if not 50 <= self.window_features <= WINDOW_FEATURES:
            raise ValueError(f"window_s must be in 1..30 s, got {window_s}")
        # Features one round's frames may span in a short window (a quarter of it stays
        # for right context, as StreamingAudioFeatures' groups).
        self._span_limit = max(FEATURES_PER_FRAME + 2, (self.window_features * 3) // 4)
        self._lookahead_samples = -(-self.lookahead_frames * SAMPLE_RATE // self.fps)
        # Encoder batches padded up to a few fixed sizes (default: on CUDA). A new batch
        # size costs cuDNN's algorithm search on first sight (hundreds of ms, holding the
        # GIL: the daemon's event loop would stall mid-utterance); ``warm`` pays for every
        # bucket at start. Padding costs at most half a batch more.
        self.batch_buckets = self.device.type == "cuda" if batch_buckets is None else bool(batch_buckets)
        self._buckets = encoder_buckets(2 * self.max_streams)
        self._slots = [_Slot() for _ in range(self.max_streams)]
        self._lock = threading.Lock()
        self._rounds = 0
        # The encoder's last layer on the rows the round reads only (exact: keys and
        # values still from every position); False runs it whole.
        self.prune_last_layer = True
        self.pruned_rounds = 0
        # CUDA graphs of the pruned 30 s encode, one per (bucket, rows) captured by
        # ``warm`` (default: on CUDA): a round's ~100 encoder kernels become one launch
        # (the host time of a round is mostly those launches). Other encodes run eagerly.
        self.graphs = (self.device.type == "cuda") if graphs is None else bool(graphs)
        self._graphs: dict[tuple[int, int], _EncoderGraph] = {}
        self.graph_rounds = 0
        # The graphed encodes through torch.compile (``device_hidden_states(compiled=True)``):
        # compiled once per shape at ``warm``, before the capture; eager encodes stay eager
        # (a compile in the middle of serving would hold the round for seconds).
        self.compile = bool(compile) and self.graphs

        device, d = self.device, AUDIO_DIM
        shape = (self.max_streams, self.ring_frames, AUDIO_TOKENS, d)
        self.tokens = torch.zeros(shape, dtype=self.dtype, device=device)
        self._audio = torch.zeros((self.max_streams, WINDOW_SAMPLES), dtype=torch.float32, device=device)
        # Incremental log-mel (default): each slot's log10 mel power stays on the device
        # and a round computes only the columns its new samples change (a 40 ms chunk:
        # about 7 of 3000) instead of the whole 30 s STFT of every slot it encodes; the
        # normalization (which needs the window's peak) runs per encode. False: the whole
        # STFT per encode (measurements compare the two).
        self.incremental_mel = True
        self._log_spec = torch.full((self.max_streams, encoder.num_mel_bins, WINDOW_MEL_FRAMES), LOG_FLOOR,
                                    dtype=torch.float32, device=device)
        self._tails = torch.zeros(
            (self.max_streams * 2, TAIL_FEATURES, HIDDEN_STATES, d), dtype=self.dtype, device=device
        )
        self._pe = torch.from_numpy(positional_encoding()).to(device)
        self._window = torch.hann_window(N_FFT, periodic=True, dtype=torch.float32, device=device)
        self._mel_filters_t = torch.from_numpy(np.ascontiguousarray(encoder.mel_filters.T, dtype=np.float32)).to(
            device
        )
        self._sample_buffers = [_HostBuffer(torch.float32, self.max_streams * SAMPLE_RATE, device) for _ in range(2)]
        self._index_buffers = [_HostBuffer(torch.int64, 1 << 14, device) for _ in range(2)]

    def encoder_info(self) -> dict[str, int | bool]:
        """How the rounds encode: CUDA graphs captured, whether compiled, rounds so far and
        how many of them replayed a graph."""
        return {"graphs": len(self._graphs), "compiled": self.compile, "rounds": self._rounds,
                "graph_rounds": self.graph_rounds}

    def bucket(self, items: int) -> int:
        """The encoder batch ``items`` run as (itself when buckets are off)."""
        if not self.batch_buckets:
            return items
        return next((b for b in self._buckets if b >= items), items)

    def warm(self) -> dict[int, float]:
        """One encode at every bucket up to one item per stream (cuDNN's search, the
        allocator's blocks; a round past that, a stream rolling over while all encode,
        is rare), with the log-mel in the form the rounds compute it: ms each, measured
        on a second run. Leaves no state behind."""
        import time

        timings: dict[int, float] = {}
        sizes = [b for b in self._buckets if b <= self.bucket(self.max_streams)] if self.batch_buckets else [1]
        with torch.inference_mode():
            for b in sizes:
                silence = self._silence(b)
                starts = torch.zeros(b, dtype=torch.long, device=self.device)
                for timed in (False, True):
                    t = time.perf_counter()
                    mel = self._mel(silence)
                    if self.window_features == WINDOW_FEATURES:
                        self.encoder.device_hidden_states(mel)
                    else:
                        self.encoder.device_hidden_states(mel[:, :, : 2 * self.window_features], starts)
                    if self.device.type == "cuda":
                        torch.cuda.current_stream(self.device).synchronize()
                    if timed:
                        timings[b] = 1000 * (time.perf_counter() - t)
        if self.graphs and self.device.type == "cuda" and self.batch_buckets and self.window_features == WINDOW_FEATURES:
            # Up to half the slots: the daemon gives a session two, and a round encodes
            # one of them (both only as an utterance hands over, or at a 30 s rollover:
            # those larger rounds run eagerly).
            half = self.bucket(-(-self.max_streams // 2))
            self._capture_graphs([b for b in sizes if b <= half])
        return timings

    def _capture_graphs(self, sizes: list[int]) -> None:
        """Capture the pruned encode at every bucket and GRAPH_QUERY_ROWS; the graphs share
        one memory pool and one static input and output buffer (rounds replay one at a
        time, in stream order). A failed capture leaves every encode eager."""
        most = max(sizes)
        try:
            mel_in = torch.zeros((most, self.encoder.num_mel_bins, 2 * WINDOW_FEATURES), dtype=torch.float32,
                                 device=self.device)
            out = torch.zeros((most, WINDOW_FEATURES, HIDDEN_STATES, AUDIO_DIM), dtype=self.dtype, device=self.device)
            pool = torch.cuda.graph_pool_handle()
            graphs = {}
            with torch.inference_mode():
                for b in sizes:
                    for q in GRAPH_QUERY_ROWS:
                        rows = torch.zeros((b, q), dtype=torch.long, device=self.device)
                        mel, dst = mel_in[:b], out[:b]

                        def encode(mel=mel, rows=rows, dst=dst) -> None:
                            self.encoder.device_hidden_states(mel, rows=rows, out=dst, compiled=self.compile)

                        side = torch.cuda.Stream(self.device)
                        side.wait_stream(torch.cuda.current_stream(self.device))
                        with torch.cuda.stream(side):
                            encode()
                            encode()
                        torch.cuda.current_stream(self.device).wait_stream(side)
                        graph = torch.cuda.CUDAGraph()
                        with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
                            encode()
                        graphs[(b, q)] = _EncoderGraph(graph, mel, rows, dst)
            torch.cuda.current_stream(self.device).synchronize()
        except Exception as exc:  # eager encodes work everywhere; say why they stay eager
            if self.compile:  # the compiled encode's fault, or the graphs'? Try them eager.
                log.warning("audio encoder: compiled CUDA graphs not captured, capturing eager encodes: %r", exc)
                self.compile = False
                self._capture_graphs(sizes)
                return
            log.warning("audio encoder CUDA graphs not captured (eager encodes): %r", exc)
            self._graphs = {}
            return
        self._graphs = graphs
        log.info("audio encoder: %d CUDA graphs captured (batches %s, rows %s), %s", len(graphs),
                 ",".join(map(str, sizes)), ",".join(map(str, GRAPH_QUERY_ROWS)),
                 "compiled" if self.compile else "eager kernels")

    # ------------------------------------------------------------------ host API

    def open(self) -> int:
        """A free slot, empty, ready for an utterance."""
        with self._lock:
            for index, slot in enumerate(self._slots):
                if not slot.open:
                    slot.clear()
                    slot.open = True
                    return index
        raise RuntimeError(
            f"all {self.max_streams} audio streams are in use: close finished ones or raise "
            f"max_streams (GpuAudioStreams(max_streams=...))"
        )

    def close(self, slot: int) -> None:
        """Free a slot; its audio and counters are dropped."""
        with self._lock:
            s = self._slot(slot)
            s.clear()
            s.open = False

    def reset(self, slot: int) -> None:
        """Drop the slot's audio and counters (interrupt); the next push starts frame 0."""
        with self._lock:
            self._slot(slot).clear()

    def push(self, slot: int, pcm16k: np.ndarray) -> None:
        """Stage float32 16 kHz samples (host only); after a flush this starts a new utterance.

        Starting a new utterance needs the flushed one's frames made and consumed (their
        ring rows are reused): reset() drops them, or open another slot to overlap.
        """
        x = np.asarray(pcm16k)
        if x.dtype.kind != "f":
            raise TypeError(
                f"push float32 16 kHz samples in [-1, 1), got {x.dtype}: convert PCM with "
                "musetalk.audio.resample_to_16k or StreamResampler"
            )
        if x.ndim != 1:
            raise ValueError(f"push mono samples as a 1-D array, got shape {x.shape}")
        x = np.array(x, dtype=np.float32)  # a copy: the caller may reuse its buffer
        if not np.isfinite(x).all():
            raise ValueError("audio samples must be finite (got NaN or inf)")
        with self._lock:
            s = self._slot(slot)
            if s.ended:
                if s.frames_ready < self._frames_total(s) or s.consumed < self._frames_total(s):
                    raise RuntimeError(
                        f"slot {slot}: the flushed utterance has {self._frames_total(s)} frames, "
                        f"{s.frames_ready} made and {s.consumed} consumed; a new utterance reuses the "
                        "ring: run round() and consumed() until both are done, reset() to drop them, "
                        "or open another slot for the next utterance"
                    )
                s.clear()
            if len(x):
                s.staged.append(x)
                s.samples += len(x)

    def flush(self, slot: int) -> None:
        """End of utterance: frames up to floor(seconds * fps) become computable, the right
        context zero-padded as offline. The next push starts a new utterance."""
        with self._lock:
            self._slot(slot).ended = True

    def consumed(self, slot: int, frame: int) -> None:
        """The caller is done with the slot's frames before ``frame``: their rows may be reused."""
        with self._lock:
            s = self._slot(slot)
            if frame > s.frames_ready:
                raise ValueError(f"slot {slot}: cannot consume frame {frame - 1}, only {s.frames_ready} are made")
            s.consumed = max(s.consumed, int(frame))

    def token_index(self, slot: int, frame: int) -> int:
        """Row of the slot's frame in ``tokens.view(-1, 50, 384)`` (ready once the round's
        device work has run: read it on the same stream)."""
        with self._lock:
            s = self._slot(slot)
            if not s.frames_ready - self.ring_frames <= frame < s.frames_ready:
                raise ValueError(
                    f"slot {slot}: frame {frame} is not in the ring (made: {s.frames_ready}, "
                    f"ring of {self.ring_frames} frames)"
                )
            return slot * self.ring_frames + frame % self.ring_frames

    def frames_ready(self, slot: int) -> int:
        """Frames made so far (their tokens are in the ring)."""
        with self._lock:
            return self._slot(slot).frames_ready

    def samples_received(self, slot: int) -> int:
        with self._lock:
            return self._slot(slot).samples

    def frames_total(self, slot: int) -> int:
        """Frames the utterance has so far if it ended now: floor(seconds * fps)."""
        with self._lock:
            return self._frames_total(self._slot(slot))

    def flushed(self, slot: int) -> bool:
        with self._lock:
            return self._slot(slot).ended

    def _slot(self, slot: int) -> _Slot:
        if not isinstance(slot, (int, np.integer)) or not 0 <= slot < self.max_streams:
            raise ValueError(f"slot must be an integer in 0..{self.max_streams - 1}, got {slot!r}")
        s = self._slots[slot]
        if not s.open:
            raise ValueError(f"slot {slot} is not open: call open() for a slot")
        return s

    def _frames_total(self, s: _Slot) -> int:
        return num_video_frames(s.samples, self.fps)

    # ------------------------------------------------------------------ the round

    def round(self) -> list[tuple[int, int, int]]:
        """Upload, encode and window everything that became computable: (slot, first, count).

        Only launches device work: the returned frames' tokens are valid for work queued
        after this call on the same stream.
        """
        with self._lock, torch.inference_mode():
            plans, uploads = self._plan()
            if plans or uploads.any_work:
                self._launch(plans, uploads)
            self._rounds += 1
            return [(p.slot, p.first, p.stop - p.first) for p in plans if p.stop > p.first]

    def _plan(self) -> tuple[list[_SlotPlan], _Uploads]:
        """Pure bookkeeping: which samples go where, which frames are made, from what."""
        up = _Uploads()
        plans: list[_SlotPlan] = []
        for index, s in enumerate(self._slots):
            if not s.open:
                continue
            if s.dirty:
                up.zero_before.append(index)
                s.dirty = False
            plan = _SlotPlan(index, s.segment)
            self._plan_uploads(index, s, plan, up)
            self._plan_frames(s, plan)
            if plan.stop > plan.first or plan.final:
                plans.append(plan)
        items = 0
        for plan in plans:
            if plan.current:
                plan.current_item = items
                items += 1
        for plan in plans:
            if plan.final:
                plan.final_item = items
                items += 1
        return plans, up

    def _plan_uploads(self, index: int, s: _Slot, plan: _SlotPlan, up: _Uploads) -> None:
        if not s.staged:
            return
        staged = s.staged[0] if len(s.staged) == 1 else np.concatenate(s.staged)
        pre = min(len(staged), WINDOW_SAMPLES - s.fill)
        post = 0
        if len(staged) > pre:
            # The segment is full and the next one has begun: move on once no frame still
            # needs more of this segment than its tail.
            boundary = (s.segment + 1) * WINDOW_FEATURES
            if frame_feature_start(s.frames_ready, self.fps) >= boundary - TAIL_FEATURES:
                post = min(len(staged) - pre, WINDOW_SAMPLES)
        if pre:
            up.pre_cols.append((index, *changed_columns(s.fill, s.fill + pre)))
            up.pre_parts.append(staged[:pre])
            up.pre_delta.append(index * WINDOW_SAMPLES + s.fill - up.pre_n)
            up.pre_lens.append(pre)
            up.pre_n += pre
            s.fill += pre
        if post:
            if s.tails[s.segment % 2] != s.segment:
                plan.final = True
                up.final_rows.append(index)
                s.tails[s.segment % 2] = s.segment
            up.zero_between.append(index)
            up.post_cols.append((index, *changed_columns(0, post)))
            up.post_parts.append(staged[pre : pre + post])
            up.post_delta.append(index * WINDOW_SAMPLES - up.post_n)
            up.post_lens.append(post)
            up.post_n += post
            s.segment += 1
            s.fill = post
            plan.segment = s.segment
        rest = staged[pre + post :]
        s.staged = [rest] if len(rest) else []

    def _plan_frames(self, s: _Slot, plan: _SlotPlan) -> None:
        plan.first = f = s.frames_ready
        plan.limit = num_feature_frames(s.samples) if s.ended else None
        cap = min(self._frames_total(s), s.consumed + self.ring_frames)
        seg_lo = s.segment * WINDOW_FEATURES
        prev_tail = plan.final or s.tails[(s.segment - 1) % 2] == s.segment - 1
        while f < cap:
            a = frame_feature_start(f, self.fps)
            if not s.ended and (a + FEATURES_PER_FRAME) * SAMPLES_PER_FEATURE + self._lookahead_samples > s.samples:
                break
            lo = max(a, 0)
            hi = a + FEATURES_PER_FRAME if plan.limit is None else min(a + FEATURES_PER_FRAME, plan.limit)
            if hi > lo:
                if hi > seg_lo + WINDOW_FEATURES:
                    break  # needs the next segment, still staged
                if lo < seg_lo and (lo < seg_lo - TAIL_FEATURES or not prev_tail):
                    raise RuntimeError(f"internal: frame {f} needs features {lo}.. of a dropped segment")
                if hi > seg_lo:
                    if plan.current and max(plan.need_hi, hi - seg_lo) - plan.need_lo > self._span_limit:
                        break  # the rest in a later round: one window must hold them
                    plan.current = True
                    plan.need_lo = min(plan.need_lo, max(lo, seg_lo) - seg_lo)
                    plan.need_hi = max(plan.need_hi, hi - seg_lo)
            f += 1
        plan.stop = f
        s.frames_ready = f
        if plan.current and s.fill == WINDOW_SAMPLES:
            plan.store_current_tail = True
            s.tails[s.segment % 2] = s.segment

    def _gather_rows(self, plans: list[_SlotPlan]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Per new frame: its ring row; per feature of its window: source and row."""
        token_rows, state_rows, tail_rows, codes = [], [], [], []
        offsets = np.arange(FEATURES_PER_FRAME)
        for p in plans:
            if p.stop <= p.first:
                continue
            frames = np.arange(p.first, p.stop)
            token_rows.append(p.slot * self.ring_frames + frames % self.ring_frames)
            starts = (frames * FEATURE_RATE) // self.fps - padding_frames(self.fps)[0]
            t = starts[:, None] + offsets[None, :]
            seg_lo = p.segment * WINDOW_FEATURES
            zero = t < 0
            if p.limit is not None:
                zero |= t >= p.limit
            current = ~zero & (t >= seg_lo)
            previous = ~zero & (t < seg_lo)
            code = np.full(t.shape, _ZERO, dtype=np.int64)
            state = np.zeros(t.shape, dtype=np.int64)
            tail = np.zeros(t.shape, dtype=np.int64)
            w = self.window_features
            code[current] = _STATE
            state[current] = p.current_item * w + t[current] - seg_lo - p.current_start
            if p.final:
                code[previous] = _STATE
                state[previous] = p.final_item * w + t[previous] - (seg_lo - WINDOW_FEATURES) - (WINDOW_FEATURES - w)
            else:
                code[previous] = _TAIL
                parity = (p.segment - 1) % 2
                tail[previous] = (p.slot * 2 + parity) * TAIL_FEATURES + t[previous] - (seg_lo - TAIL_FEATURES)
            state_rows.append(state.reshape(-1))
            tail_rows.append(tail.reshape(-1))
            codes.append(code.reshape(-1))
        if not token_rows:
            empty = np.zeros(0, dtype=np.int64)
            return empty, empty, empty, empty
        return tuple(np.concatenate(x) for x in (token_rows, state_rows, tail_rows, codes))

    def _window_start(self, p: _SlotPlan) -> int:
        """First feature of the encoded window of the device segment (0 with 30 s)."""
        w = self.window_features
        if w == WINDOW_FEATURES:
            return 0
        if p.store_current_tail:
            return WINDOW_FEATURES - w  # the segment's last features are kept as its tail
        # A quarter of the window after the newest needed feature (zero-padded future, as a
        # segment's tail is offline), the rest as left context; never outside the segment.
        return min(p.need_lo, max(0, p.need_hi + w // 4 - w), WINDOW_FEATURES - w)

    def _replay(self, graph: _EncoderGraph, mel: torch.Tensor, rows: torch.Tensor) -> torch.Tensor | None:
        """The graphed encode of ``mel`` at ``rows``: its static output (valid until the
        next replay, which is stream-ordered after this round's readers), or None, with
        every graph dropped, if the replay failed (the encode then runs eagerly)."""
        try:
            graph.mel.copy_(mel)
            graph.rows.copy_(rows)
            graph.graph.replay()
        except Exception as exc:
            log.error("audio encoder CUDA graph replay failed: encodes run eagerly from now on: %r", exc)
            self._graphs = {}
            return None
        self.graph_rounds += 1
        return graph.out

    def _query_rows(self, items: int, state_rows: np.ndarray, codes: np.ndarray,
                    tail_items: list[int]) -> np.ndarray | None:
        """The window positions each encoded item's frames and tail read, as the same
        number Q of consecutive rows per item ([bucket(items), Q]), for an encoder whose
        last layer computes only those (``device_hidden_states(rows=...)``); None (the
        whole layer) when no item is encoded or the rows are most of the window (a burst
        of audio after a stall)."""
        if not items or not self.prune_last_layer:
            return None
        w = self.window_features
        lo = np.full(items, w, dtype=np.int64)
        hi = np.zeros(items, dtype=np.int64)
        read = state_rows[codes == _STATE]
        np.minimum.at(lo, read // w, read % w)
        np.maximum.at(hi, read // w, read % w + 1)
        if tail_items:
            lo[tail_items] = np.minimum(lo[tail_items], w - TAIL_FEATURES)
            hi[tail_items] = w
        lo = np.minimum(lo, hi)  # an item reading nothing (never planned) gets no span
        q = -(-max(1, int((hi - lo).max())) // QUERY_ROW_STEP) * QUERY_ROW_STEP
        if 2 * q > w:
            return None
        n = self.bucket(items) if self.batch_buckets else items
        first = np.zeros(n, dtype=np.int64)
        first[:items] = np.minimum(lo, w - q)
        self.pruned_rounds += 1
        return first[:, None] + np.arange(q, dtype=np.int64)[None, :]

    def _launch(self, plans: list[_SlotPlan], up: _Uploads) -> None:
        """Device work of one round, in stream order; no host sync."""
        for p in plans:
            if p.current:
                p.current_start = self._window_start(p)
        token_rows, state_rows, tail_rows, codes = self._gather_rows(plans)
        current_rows = [p.slot for p in plans if p.current]
        tail_store = [(p.current_item, p.slot * 2 + p.segment % 2) for p in plans if p.store_current_tail]
        tail_store += [(p.final_item, p.slot * 2 + (p.segment - 1) % 2) for p in plans if p.final]
        starts = [p.current_start for p in plans if p.current] + [WINDOW_FEATURES - self.window_features] * sum(
            1 for p in plans if p.final)
        query_rows = self._query_rows(len(starts), state_rows, codes, [i for i, _ in tail_store])
        incremental = self.incremental_mel
        pre_cols = up.pre_cols if incremental else []
        post_cols = up.post_cols if incremental else []
        ints = [
            up.zero_before, up.pre_delta, up.pre_lens, up.final_rows, up.zero_between,
            up.post_delta, up.post_lens, current_rows, token_rows, state_rows, tail_rows, codes,
            [i for i, _ in tail_store], [r for _, r in tail_store], starts,
            query_rows.reshape(-1) if query_rows is not None else [],
            [c[0] for c in pre_cols], [c[1] for c in pre_cols], [c[0] for c in post_cols], [c[1] for c in post_cols],
        ]
        ints = [np.asarray(x, dtype=np.int64) for x in ints]
        which = self._rounds % 2
        samples_buffer, index_buffer = self._sample_buffers[which], self._index_buffers[which]
        n_samples = samples_buffer.fill(up.pre_parts + up.post_parts)
        n_ints = index_buffer.fill(ints)
        samples = samples_buffer.upload(n_samples) if n_samples else None
        flat = index_buffer.upload(n_ints)
        views, pos = [], 0
        for x in ints:
            views.append(flat[pos : pos + len(x)])
            pos += len(x)
        (zero_before, pre_delta, pre_lens, final_rows, zero_between, post_delta, post_lens,
         current_rows_t, token_rows_t, state_rows_t, tail_rows_t, codes_t, tail_items, tail_dst, starts_t,
         query_rows_t, pre_col_rows, pre_col_first, post_col_rows, post_col_first) = views
        query_rows_t = query_rows_t.view(query_rows.shape) if query_rows is not None else None

        audio, log_spec = self._audio, self._log_spec
        if len(up.zero_before):
            audio.index_fill_(0, zero_before, 0.0)
            log_spec.index_fill_(0, zero_before, LOG_FLOOR)
        if up.pre_n:
            self._scatter(samples[: up.pre_n], pre_delta, pre_lens, up.pre_n)
            if pre_cols:
                self._update_log_spec(pre_col_rows, pre_col_first, max(c[2] - c[1] for c in pre_cols))
        # The segments encoded once complete, before their buffers take the next segment.
        final_src = log_spec if incremental else audio
        final = final_src.index_select(0, final_rows) if len(up.final_rows) else None
        if len(up.zero_between):
            audio.index_fill_(0, zero_between, 0.0)
            log_spec.index_fill_(0, zero_between, LOG_FLOOR)
        if up.post_n:
            self._scatter(samples[up.pre_n :], post_delta, post_lens, up.post_n)
            if post_cols:
                self._update_log_spec(post_col_rows, post_col_first, max(c[2] - c[1] for c in post_cols))
        items = []
        if current_rows:
            items.append((log_spec if incremental else audio).index_select(0, current_rows_t))
        if final is not None:
            items.append(final)
        states = None
        if items:
            batch = torch.cat(items) if len(items) > 1 else items[0]
            n = batch.shape[0]
            if self.batch_buckets and self.bucket(n) > n:
                batch = torch.cat([batch, self._silence(self.bucket(n) - n)])
                starts_t = torch.cat([starts_t, starts_t.new_zeros(self.bucket(n) - n)])
            mel = self._mel(batch)
            graph = self._graphs.get((mel.shape[0], query_rows_t.shape[1])) if query_rows_t is not None else None
            if graph is not None:
                states = self._replay(graph, mel, query_rows_t)
            if states is None and self.window_features == WINDOW_FEATURES:
                states = self.encoder.device_hidden_states(mel, rows=query_rows_t)  # [items, 1500, 5, 384]
            elif states is None:
                w = self.window_features
                cols = 2 * starts_t[:, None] + torch.arange(2 * w, device=self.device)[None, :]
                mel = torch.gather(mel, 2, cols[:, None, :].expand(-1, mel.shape[1], -1))
                states = self.encoder.device_hidden_states(mel, starts_t, rows=query_rows_t)  # [items, w, 5, 384]
        if len(token_rows):
            from_tail = self._tails.view(-1, HIDDEN_STATES, AUDIO_DIM).index_select(0, tail_rows_t)
            code = codes_t.view(-1, 1, 1)
            window = torch.where(code == _TAIL, from_tail, 0.0)
            if states is not None:
                from_state = states.reshape(-1, HIDDEN_STATES, AUDIO_DIM).index_select(0, state_rows_t)
                window = torch.where(code == _STATE, from_state, window)
            tokens = window.view(-1, AUDIO_TOKENS, AUDIO_DIM).float() + self._pe
            self.tokens.view(-1, AUDIO_TOKENS, AUDIO_DIM).index_copy_(0, token_rows_t, tokens.to(self.dtype))
        if tail_store:
            tails = states.index_select(0, tail_items)[:, self.window_features - TAIL_FEATURES :]
            self._tails.index_copy_(0, tail_dst, tails)

    def _silence(self, n: int) -> torch.Tensor:
        """``n`` silent segments in the form a round encodes from: log10 mel power at the
        floor (incremental log-mel) or zero samples."""
        if self.incremental_mel:
            return self._log_spec.new_full((n, *self._log_spec.shape[1:]), LOG_FLOOR)
        return self._audio.new_zeros((n, WINDOW_SAMPLES))

    def _mel(self, batch: torch.Tensor) -> torch.Tensor:
        """The encoder's input, [B, n_mels, 3000], of segments in the form ``_silence`` names."""
        if self.incremental_mel:
            return normalize_log_mel(batch)
        return log_mel_device(batch, self._mel_filters_t, self._window)

    def _update_log_spec(self, rows: torch.Tensor, first: torch.Tensor, widest: int) -> None:
        """Recompute the log-mel columns first[i] .. first[i] + widest - 1 of segment rows[i]
        (those its new samples changed; past the changed ones they are recomputed as they
        are, so one width serves the round) from the samples now on the device."""
        width = COLUMN_STEP
        while width < widest:
            width *= 2
        columns = (first[:, None] + torch.arange(width, device=self.device)[None, :]).clamp_(max=WINDOW_MEL_FRAMES - 1)
        values = log_mel_columns(self._audio, rows, columns, self._mel_filters_t, self._window)  # [n, K, mels]
        self._log_spec[rows[:, None], :, columns] = values

    def _scatter(self, samples: torch.Tensor, delta: torch.Tensor, lens: torch.Tensor, n: int) -> None:
        """Sample i of piece p goes to flat position i + delta[p] of the segment buffers."""
        shift = torch.repeat_interleave(delta, lens, output_size=n)
        dst = torch.arange(n, device=self.device) + shift
        self._audio.view(-1).index_copy_(0, dst, samples)


# --------------------------------------------------------------------------- measurement


def drain(streams: GpuAudioStreams, out: dict[int, list[np.ndarray]] | None = None) -> int:
    """Run rounds until none makes a frame, copying the new tokens to the host and
    reporting them consumed (``out[slot]``, a list of [50, 384] float32 arrays per slot).

    For tests and measurements: the daemon's worker reads the tokens on the device.
    Returns the number of rounds that made frames.
    """
    productive = 0
    while made := streams.round():
        productive += 1
        for slot, first, count in made:
            rows = [streams.token_index(slot, f) for f in range(first, first + count)]
            tokens = streams.tokens.view(-1, AUDIO_TOKENS, AUDIO_DIM)[rows].float().cpu().numpy()
            if out is not None:
                out.setdefault(slot, []).extend(tokens)
            streams.consumed(slot, first + count)
    return productive


def gpu_stream_tokens(
    encoder: WhisperAudioEncoder, pcm16k: np.ndarray, chunk_samples: int, fps: int = 25, lookahead_frames: int = 0,
    graphs: bool = False, compile: bool = False,
) -> np.ndarray:
    """Tokens [floor(seconds * fps), 50, 384] of one utterance pushed in fixed-size chunks
    through ``GpuAudioStreams``, rounds after every push (as ``musetalk.audio.stream_tokens``);
    ``graphs``: with the encoder's CUDA graphs (captured by ``warm``), ``compile``: of the
    compiled encode."""
    streams = GpuAudioStreams(encoder, fps=fps, max_streams=1, lookahead_frames=lookahead_frames, graphs=graphs,
                              compile=compile)
    if graphs:
        streams.warm()
    slot = streams.open()
    out: dict[int, list[np.ndarray]] = {}
    for start in range(0, len(pcm16k), chunk_samples):
        streams.push(slot, pcm16k[start : start + chunk_samples])
        drain(streams, out)
    streams.flush(slot)
    drain(streams, out)
    tokens = out.get(slot, [])
    return np.stack(tokens) if tokens else np.zeros((0, AUDIO_TOKENS, AUDIO_DIM), dtype=np.float32)


def time_rounds(
    encoder: WhisperAudioEncoder, pcm16k: np.ndarray, slots: int, chunk_samples: int, rounds: int, warmup: int,
    prune: bool = True, graphs: bool = False, incremental_mel: bool = True, compile: bool = False,
) -> dict[str, float]:
    """Steady state mid-utterance: each of ``slots`` streams starts with 1 s of audio
    (its frames made and consumed untimed), then every round each gets one chunk and
    its frames are consumed at once. Returns ms per round (host launch time, and with
    the device synchronized) over the rounds that made frames."""
    import time

    streams = GpuAudioStreams(encoder, max_streams=2 * slots, graphs=graphs,  # two a session, as the daemon
                              compile=compile)
    streams.prune_last_layer = prune
    streams.incremental_mel = incremental_mel
    if graphs:
        streams.warm()  # captures the graphs
    ids = [streams.open() for _ in range(slots)]
    prefill = SAMPLE_RATE
    x = np.resize(pcm16k, prefill + (rounds + warmup) * chunk_samples + slots * 1601)
    cuda = streams.device.type == "cuda"

    def round_and_consume() -> list[tuple[int, int, int]]:
        made = streams.round()
        for slot, first, count in made:
            streams.consumed(slot, first + count)
        return made

    for i, slot in enumerate(ids):
        streams.push(slot, x[i * 1601 : i * 1601 + prefill])  # a different phase per slot
    while round_and_consume():
        pass
    host_ms, total_ms, frames = [], [], 0
    for r in range(rounds + warmup):
        for i, slot in enumerate(ids):
            start = i * 1601 + prefill + r * chunk_samples
            streams.push(slot, x[start : start + chunk_samples])
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        made = streams.round()
        t1 = time.perf_counter()
        if cuda:
            torch.cuda.synchronize()
        t2 = time.perf_counter()
        for slot, first, count in made:
            streams.consumed(slot, first + count)
        if r >= warmup and made:
            host_ms.append(1e3 * (t1 - t0))
            total_ms.append(1e3 * (t2 - t0))
            frames += sum(count for _, _, count in made)
    return {
        "rounds": len(total_ms),
        "frames": frames,
        "host_ms_mean": float(np.mean(host_ms)) if host_ms else 0.0,
        "round_ms_mean": float(np.mean(total_ms)) if total_ms else 0.0,
        "round_ms_max": float(np.max(total_ms)) if total_ms else 0.0,
        "graph_rounds": streams.graph_rounds,
    }


def _main() -> None:
    import argparse
    import tempfile
    import time
    from pathlib import Path

    import soundfile as sf

    from musetalk.audio import offline_tokens, resample_to_16k, stream_tokens, token_errors
    from musetalk.whisper import load_whisper_encoder, write_random_whisper

    parser = argparse.ArgumentParser(description="Measure device-resident streamed vs offline tokens and round cost.")
    parser.add_argument("--wav", default="tests/data/speech.wav")
    parser.add_argument("--model", help="whisper folder; default: random weights of --size")
    parser.add_argument("--size", choices=("full", "tiny"), default="full")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=("float32", "float16"), help="default: float16 on cuda, else float32")
    parser.add_argument("--chunks-ms", default="20,40")
    parser.add_argument("--lookahead", type=int, default=0)
    parser.add_argument("--slots", help="B values for the round timing; default 1,8,24,64 on cuda, 1,4 on the CPU")
    parser.add_argument("--rounds", type=int, help="timed rounds per B; default 50 on cuda, 3 on the CPU")
    parser.add_argument("--against-stream", action="store_true", help="also compare with StreamingAudioFeatures")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="on cuda: device ms of N pruned encodes per B by kernel kind, the costliest kernels")
    parser.add_argument("--stages-only", action="store_true",
                        help="on cuda: only the stage timings per B (log-mel, encoder eager, graphed, compiled)")
    args = parser.parse_args()

    cuda = args.device.startswith("cuda")
    dtype = getattr(torch, args.dtype or ("float16" if cuda else "float32"))
    slots = [int(b) for b in (args.slots or ("1,8,24,64" if cuda else "1,4")).split(",")]
    rounds = args.rounds or (50 if cuda else 3)
    pcm, rate = sf.read(args.wav, dtype="int16")
    x = resample_to_16k(pcm, rate)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(args.model) if args.model else write_random_whisper(Path(tmp), args.size)
        encoder = load_whisper_encoder(model_dir, device=args.device, dtype=dtype)
        offline = offline_tokens(encoder, x)
        for chunk_ms in [int(c) for c in args.chunks_ms.split(",")] if not (cuda and args.stages_only) else []:
            t0 = time.perf_counter()
            streamed = gpu_stream_tokens(encoder, x, 16 * chunk_ms, lookahead_frames=args.lookahead)
            errors = token_errors(streamed, offline)
            line = (
                f"size={args.size} device={args.device} dtype={str(dtype).split('.')[-1]} chunk={chunk_ms}ms "
                f"lookahead={args.lookahead} frames={len(streamed)} "
                + " ".join(f"{k}={v:.3g}" for k, v in errors.items())
                + f" wall={time.perf_counter() - t0:.1f}s"
            )
            if args.against_stream:
                reference = stream_tokens(encoder, x, 16 * chunk_ms, lookahead_frames=args.lookahead)
                line += f" vs_StreamingAudioFeatures_max_abs={np.abs(streamed - reference).max():.3g}"
            print(line, flush=True)
        for chunk_ms in [int(c) for c in args.chunks_ms.split(",")] if not (cuda and args.stages_only) else []:
            for b in slots:
                variants = ((False, False, True, False), (True, False, True, False))
                if cuda:  # graphed (the daemon's form, eager and compiled), then the whole STFT per encode
                    variants += ((True, True, True, False), (True, True, True, True), (True, True, False, False))
                for prune, graphs, incremental, compiled in variants:
                    timing = time_rounds(encoder, x, b, 16 * chunk_ms, rounds, warmup=10 if cuda else 2, prune=prune,
                                         graphs=graphs, incremental_mel=incremental, compile=compiled)
                    print(
                        f"round B={b} chunk={chunk_ms}ms last layer {'pruned' if prune else 'whole'}, "
                        f"{'compiled graphs' if compiled else 'graphs' if graphs else 'eager'}, "
                        f"{'incremental' if incremental else 'whole-STFT'} log-mel: "
                        f"{timing['round_ms_mean']:.2f} ms per round with frames "
                        f"(max {timing['round_ms_max']:.2f}, host launch {timing['host_ms_mean']:.2f}), "
                        f"{timing['rounds']} rounds, {timing['frames']} frames, {timing['graph_rounds']} graphed",
                        flush=True,
                    )
        if cuda:
            for chunk_ms in [int(c) for c in args.chunks_ms.split(",")]:
                eager = gpu_stream_tokens(encoder, x, 16 * chunk_ms, graphs=False)
                graphed = gpu_stream_tokens(encoder, x, 16 * chunk_ms, graphs=True)
                compiled = gpu_stream_tokens(encoder, x, 16 * chunk_ms, graphs=True, compile=True)
                print(f"graphed vs eager tokens, chunk={chunk_ms}ms: frames {len(graphed)}/{len(eager)}, "
                      f"max abs {np.abs(graphed - eager).max():.3g}; compiled graphs: frames {len(compiled)}, "
                      f"max abs {np.abs(compiled - eager).max():.3g}", flush=True)
        if cuda:
            for b in slots:
                mel_ms, columns_ms, encoder_ms, pruned_ms, graph_ms, compiled_ms = _time_stages(encoder, b)
                if args.profile:
                    _profile_encoder(encoder, b, args.profile)
                print(f"stages B={b}: log-mel {mel_ms:.2f} ms whole STFT, {columns_ms:.2f} ms incremental "
                      f"({COLUMN_STEP} columns and the normalization), encoder {encoder_ms:.2f} ms, "
                      f"encoder with the last layer on {QUERY_ROW_STEP} rows {pruned_ms:.2f} ms, "
                      f"the same as a CUDA graph {graph_ms:.2f} ms, compiled {compiled_ms:.2f} ms", flush=True)


def _profile_encoder(encoder: WhisperAudioEncoder, items: int, calls: int) -> None:
    """Print where a pruned encode of ``items`` windows spends its device time (the eager
    encode runs the kernels its CUDA graph replays)."""
    from types import SimpleNamespace

    from musetalk.step_bench import profile_steps

    mel = torch.randn(items, encoder.num_mel_bins, 2 * WINDOW_FEATURES, device=encoder.device)
    rows = (1400 + torch.arange(QUERY_ROW_STEP, device=encoder.device).expand(items, -1)).contiguous()
    with torch.inference_mode():
        for _ in range(3):
            encoder.device_hidden_states(mel, rows=rows)

        def launch() -> SimpleNamespace:
            encoder.device_hidden_states(mel, rows=rows)
            return SimpleNamespace(boxes=lambda: None)

        k = profile_steps(launch, calls, cuda=encoder.device.type == "cuda", top=10)
    kinds = ", ".join(f"{kind} {ms:.3f}" for kind, ms in k["by_kind_ms"].items())
    print(f"encoder profile B={items}: {k['total_ms']:.3f} ms a call ({k['total_ms'] / items:.3f} ms an encode): "
          f"{kinds}", flush=True)
    for item in k["top"]:
        print(f"    {item['ms']:7.3f} ms x{item['calls']:<3} {item['kind']:<9} {item['name'][:100]}", flush=True)


def _time_stages(encoder: WhisperAudioEncoder, items: int,
                 repeat: int = 20) -> tuple[float, float, float, float, float, float]:
    """Device ms of the two big stages of a round with ``items`` encodes (the log-mel
    whole and incremental, a 40 ms chunk's columns then the normalization; the encoder
    whole, then with its last layer on QUERY_ROW_STEP rows, a 40 ms chunk's, eager and as
    a CUDA graph, eager and compiled). Eager calls queued back to back are bound by their launches where the
    device is faster than the host; the graph's figure is the device's."""
    window = torch.hann_window(N_FFT, device=encoder.device)
    filters = torch.from_numpy(np.ascontiguousarray(encoder.mel_filters.T, dtype=np.float32)).to(encoder.device)
    audio = 0.1 * torch.randn(items, WINDOW_SAMPLES, device=encoder.device)
    mel = log_mel_device(audio, filters, window)

    def ms(fn) -> float:
        for _ in range(3):
            fn()
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeat):
            fn()
        stop.record()
        stop.synchronize()
        return start.elapsed_time(stop) / repeat

    rows = (1400 + torch.arange(QUERY_ROW_STEP, device=encoder.device).expand(items, -1)).contiguous()
    out = torch.empty((items, WINDOW_FEATURES, HIDDEN_STATES, AUDIO_DIM), dtype=encoder.dtype, device=encoder.device)
    with torch.inference_mode():
        for _ in range(2):
            encoder.device_hidden_states(mel, rows=rows, out=out)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            encoder.device_hidden_states(mel, rows=rows, out=out)
        for _ in range(2):
            encoder.device_hidden_states(mel, rows=rows, out=out, compiled=True)
        torch.cuda.synchronize()
        compiled = torch.cuda.CUDAGraph()
        with torch.cuda.graph(compiled):
            encoder.device_hidden_states(mel, rows=rows, out=out, compiled=True)
    spec = log_spec_device(audio, filters, window)
    slots = torch.arange(items, device=encoder.device)
    columns = (1200 + torch.arange(COLUMN_STEP, device=encoder.device)).expand(items, -1)

    def incremental() -> None:
        spec[slots[:, None], :, columns] = log_mel_columns(audio, slots, columns, filters, window)
        normalize_log_mel(spec)

    return (ms(lambda: log_mel_device(audio, filters, window)), ms(incremental),
            ms(lambda: encoder.device_hidden_states(mel)),
            ms(lambda: encoder.device_hidden_states(mel, rows=rows)), ms(graph.replay), ms(compiled.replay))


if __name__ == "__main__":
    _main()
