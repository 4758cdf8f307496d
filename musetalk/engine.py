"""The per-step generator: a batch of frames of any mix of avatars -> blended mouth boxes.

One step = gather latents -> UNet (timestep 0, cross-attention on the audio tokens)
-> VAE decode -> resize each 256x256 face to its face box and blend it into its box with
the avatar's soft mask (scaled by the frame's ``blend``), all on the device
(``musetalk.stages``). Two ways out:

- ``launch`` (the daemon's path): the blended boxes are converted to I420 on the device
  (``musetalk.color``) and only they leave it, on a copy stream into pinned memory; the
  call returns at once with a ``Launched`` handle, so the caller prepares the next step
  while this one runs. The caller writes each box into the avatar's idle I420 frame.
- ``step`` (offline render, tests, benchmarks): the same generation, returning full
  RGBA frames composed on the host.

Boxes are the avatars' blend boxes widened to even coordinates (whole 2x2 chroma
blocks); the widened pixels have mask 0, so they are the idle pixels, bit for bit.

Memory layout: on the device, per avatar, latents (N, 8, 32, 32) and, for paste-back, the
box pixels of every frame and its mask, zero-padded to the avatar's largest box. Full
frames stay on the host.

Audio tokens arrive with MuseTalk's sinusoidal positional encoding already added.
Inference runs under ``torch.inference_mode()``; the class never touches asyncio.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from musetalk import cropped_decode, stages
from musetalk.color import pack_i420, rgb_to_i420_planes
from musetalk.models import MuseTalkModels
from musetalk.subpixel import use_subpixel_upsampling
from musetalk.types import AUDIO_DIM, AUDIO_TOKENS, LATENT_SIZE, FrameJob, GeneratedBox, PreparedAvatar

log = logging.getLogger(__name__)


@dataclass
class _DeviceAvatar:
    key: str
    num_frames: int
    width: int
    height: int
    latents: torch.Tensor  # (N, 8, 32, 32) model dtype, device
    crops: torch.Tensor  # (N, Hb, Wb, 3) uint8, device: box pixels of each frame
    masks: torch.Tensor  # (N, Hb, Wb) uint8, device
    geometry: torch.Tensor  # (N, 8) float32, device: box then face box (x1, y1, x2, y2)
    boxes: np.ndarray  # (N, 4) int, host: the even boxes
    frames_rgb: np.ndarray  # (N, H, W, 3) uint8, host (read only)
    frames_rgba: np.ndarray | None  # (N, H, W, 4) uint8, host, when the caller shares them
    # (N, layers, groups, 2) float32, device: the cropped decode's cached GroupNorm sums,
    # set once the crop is validated for this avatar (until then: the whole decode).
    gn_sums: torch.Tensor | None = None
    # The same for the engine's higher crop plan (``crop_row_high``), where this avatar's
    # blend starts low enough in the face and that plan passed its validation too.
    gn_sums_high: torch.Tensor | None = None

    @property
    def device_bytes(self) -> int:
        tensors = [self.latents, self.crops, self.masks, self.geometry] + [
            t for t in (self.gn_sums, self.gn_sums_high) if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors)


def buckets(max_batch: int, step: int = 8) -> list[int]:
    """Batch sizes a compiled engine pads to: 4, 8, 12 and 16 (small batches are the
    short steps that keep latency low: a step of 12 costs about a quarter less than one
    of 16), and above 12 every multiple of ``step`` up to ``max_batch`` (24 frames run
    as 24, not 32; with ``step`` 1, 13 run as 13, not 16). A saturated GPU launches what
    arrived during the last step, about 15 frames at 24 sessions on an H100, each a
    whole frame's cost in the padding to 16."""
    sizes = [b for b in (4, 8, 12, 16) if b < max_batch]
    sizes += [b for b in range(step, max_batch, step) if b > 12] + [max_batch]
    return sorted(set(sizes))


def allow_recompiles(entries: int) -> int:
    """Let Dynamo keep ``entries`` compiled versions of one function (its
    ``recompile_limit``, 8 by default, is per code object); returns the limit now.

    The cropped decode is compiled with static shapes, one graph per bucket and crop plan,
    and both plans' functions share one code object (closures of one ``def``): 7 buckets
    (``bucket_step`` 1) and 2 plans are 14 versions, and past the limit Dynamo runs the
    rest eagerly, without a CUDA graph and without a word above a warning."""
    import torch._dynamo

    cfg = torch._dynamo.config
    cfg.recompile_limit = max(int(cfg.recompile_limit), int(entries))
    return int(cfg.recompile_limit)


def even_boxes(blend: np.ndarray, width: int, height: int) -> np.ndarray:
    """Blend boxes widened to even coordinates, inside the even part of the frame."""
    b = np.asarray(blend, dtype=np.int64).copy()
    b[:, 0] -= b[:, 0] & 1
    b[:, 1] -= b[:, 1] & 1
    b[:, 2] = np.minimum(b[:, 2] + (b[:, 2] & 1), width - (width & 1))
    b[:, 3] = np.minimum(b[:, 3] + (b[:, 3] & 1), height - (height & 1))
    return b


class Launched:
    """A step in flight: ``ready()`` without waiting, ``boxes()`` waits for the copy-out."""

    def __init__(self, keys: list[str], indices: list[int], boxes: np.ndarray, host: torch.Tensor,
                 hb: int, wb: int, event: "torch.cuda.Event | None", start: "torch.cuda.Event | None" = None,
                 seconds: float | None = None, stage_events: list | None = None,
                 unet_queued_at: float | None = None) -> None:
        self.keys, self.indices, self._boxes = keys, indices, boxes
        # perf_counter() when the UNet's work was queued (the device can start the step's
        # bulk from then on while the host queues the rest).
        self.unet_queued_at = unet_queued_at
        self._host, self._hb, self._wb, self._event = host, hb, wb, event
        self._start, self._seconds = start, seconds
        self._stage_events = stage_events

    def ready(self) -> bool:
        return self._event is None or self._event.query()

    def stage_ms(self) -> dict[str, float] | None:
        """Device ms of each stage (unet, vae_decode, paste, copy_out, total) of a step
        launched with ``timed=True``, once it is done; None otherwise."""
        if self._stage_events is None or self._event is None or not self.ready():
            return None
        return _stage_ms(self._stage_events, self._event)

    def gpu_seconds(self) -> float | None:
        """Device time of the step (from its start on the stream to the end of its
        copy-out), once it is done; the host time on a CPU."""
        if self._start is not None and self._event is not None and self.ready():
            return self._start.elapsed_time(self._event) / 1000
        return self._seconds

    def boxes(self) -> list[GeneratedBox]:
        if self._event is not None:
            self._event.synchronize()
        host = self._host.numpy()
        hb, wb = self._hb, self._wb
        ny, nc = hb * wb, (hb // 2) * (wb // 2)
        out = []
        for b, (key, index) in enumerate(zip(self.keys, self.indices)):
            x1, y1, x2, y2 = (int(v) for v in self._boxes[b])
            h, w = y2 - y1, x2 - x1
            row = host[b]
            y = row[:ny].reshape(hb, wb)[:h, :w].copy()
            u = row[ny : ny + nc].reshape(hb // 2, wb // 2)[: h // 2, : w // 2].copy()
            v = row[ny + nc : ny + 2 * nc].reshape(hb // 2, wb // 2)[: h // 2, : w // 2].copy()
            out.append(GeneratedBox(key, index, x1, y1, x2, y2, y, u, v))
        return out


class Engine:
    """Batched MuseTalk generation across avatars on one device.

    ``compile=True`` (CUDA only) wraps the UNet and the VAE decode in
    ``torch.compile(mode="reduce-overhead")`` (CUDA graphs, channels_last, cuDNN
    autotuning) and pads each batch up to a bucket size (``buckets``) so that graphs are
    reused. ``compile_dynamic`` compiles once with a symbolic batch size (one CUDA graph
    recorded per bucket) instead of once per bucket.
    """

    def __init__(
        self,
        models: MuseTalkModels,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        compile: bool = False,
        max_batch: int = 32,
        channels_last: bool | None = None,
        compile_dynamic: bool = True,
        bucket_step: int = 8,
        pad_to_buckets: bool | None = None,
        decode: str = "full",
        crop_row: int = 96,
        crop_row_high: int = 0,
        crop_tolerance: float = 1.0,
        fuse_step: bool = False,
        inductor: dict | None = None,
        upsample: str = "nearest",
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.models = models
        self.device = torch.device(device) if device is not None else models.device
        self.dtype = dtype or models.dtype
        if self.device != models.device or self.dtype != models.dtype:
            models.unet.to(self.device, self.dtype)
            models.vae.to(self.device, self.dtype)
            models.device, models.dtype = self.device, self.dtype
        self.max_batch = max_batch
        self.compiled = bool(compile) and self.device.type == "cuda"
        if compile and not self.compiled:
            log.info("compile requested on %s: running eager (compile is CUDA only)", self.device)
        if channels_last is None:
            channels_last = self.compiled
        if channels_last:
            models.unet.to(memory_format=torch.channels_last)
            models.vae.to(memory_format=torch.channels_last)
        # "subpixel": every upsampler (nearest 2x + 3x3 conv) of the UNet and the decoder
        # as one 2x2 convolution of its input (the same function, 4/9 of its FLOPs;
        # ``musetalk.subpixel``); "transposed": the same as a stride-2 transposed
        # convolution (no phase interleave). It changes the models in place, for every
        # user of them.
        if upsample not in ("nearest", "subpixel", "transposed"):
            raise ValueError(f"upsample {upsample!r} must be nearest, subpixel or transposed")
        self.upsample = upsample
        if upsample != "nearest":
            swapped = (use_subpixel_upsampling(models.unet, upsample)
                       + use_subpixel_upsampling(models.vae.decoder, upsample))
            log.info("%s upsampling: %d upsamplers", upsample, swapped)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        # Buckets on CUDA, compiled or not: with cuDNN's benchmark mode every new batch
        # size would start an algorithm search (about a second, GIL held) mid-speech.
        # (``pad_to_buckets`` forces either way: the CPU tests of batch sizing use it.)
        if pad_to_buckets is None:
            pad_to_buckets = self.compiled or self.device.type == "cuda"
        self._buckets = buckets(max_batch, bucket_step) if pad_to_buckets else []
        self._avatars: dict[str, _DeviceAvatar] = {}
        self._timestep = torch.zeros((), dtype=torch.long, device=self.device)
        self._copy_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.record_timings = False
        self.warmup_device_ms: dict[int, float] = {}  # set by ``warmup``
        self.last_timings_ms: dict[str, float] = {}
        self._unet_queued_at: float | None = None  # the last step's (Launched.unet_queued_at)

        unet, vae, timestep = models.unet, models.vae, self._timestep

        def unet_fn(latents: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
            return stages.unet_step(unet, latents, audio, timestep)

        def decode_fn(latents: torch.Tensor) -> torch.Tensor:
            return stages.decode(vae, latents)

        # The cropped decode (``musetalk.cropped_decode``): "auto" uses it for the avatars
        # whose validation passed, "cropped" for every avatar whose blend it covers
        # (benchmarks with random weights), "full" never.
        if decode not in ("auto", "full", "cropped"):
            raise ValueError(f"decode {decode!r} must be auto, full or cropped")
        self.decode_mode = decode
        self.crop_tolerance = crop_tolerance
        self.crop_plan = cropped_decode.plan_crop(vae.decoder, crop_row) if decode != "full" and crop_row else None
        # A second, higher plan (fewer rows) for the avatars whose blend starts at or below
        # ``crop_row_high``: a step uses it when every avatar in it has it.
        if crop_row_high and self.crop_plan is not None and crop_row_high <= crop_row:
            raise ValueError(f"crop_row_high ({crop_row_high}) must be above crop_row ({crop_row}), or 0 (none)")
        self.crop_plan_high = (cropped_decode.plan_crop(vae.decoder, crop_row_high)
                               if self.crop_plan is not None and crop_row_high else None)
        plan, plan_high = self.crop_plan, self.crop_plan_high

        def crop_fns(plan: cropped_decode.CropPlan | None) -> tuple[Callable, Callable]:
            """The cropped decode under ``plan``, and the step with it (UNet, then that decode)."""

            def crop_fn(latents: torch.Tensor, sums: torch.Tensor) -> torch.Tensor:
                return cropped_decode.decode_to_unit_rows(vae, latents, plan, sums)

            def fused_crop_fn(latents: torch.Tensor, audio: torch.Tensor, sums: torch.Tensor) -> torch.Tensor:
                return crop_fn(unet_fn(latents, audio), sums)

            return crop_fn, fused_crop_fn

        def fused_fn(latents: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
            return decode_fn(unet_fn(latents, audio))

        self._unet_fn, self._decode_fn = unet_fn, decode_fn
        self._crop_fn, self._fused_crop_fn = crop_fns(plan)
        self._crop_high_fn, self._fused_crop_high_fn = crop_fns(plan_high)
        self.fused = bool(fuse_step)
        self._fused_fn = fused_fn
        self._dynamic = compile_dynamic and not self.fused
        self._mark_dynamic = 0
        if self.compiled:
            # Every bucket of every plan, and a batch of 1 beside the dynamic UNet's range.
            allow_recompiles(len(self._buckets) * 3 + 4)
            # "reduce-overhead" is Inductor with CUDA graphs; options and mode exclude
            # each other in torch.compile, so extra options come with the graphs' flag.
            graphs = ({"options": {"triton.cudagraphs": True, **inductor}} if inductor
                      else {"mode": "reduce-overhead"})
            opts = dict(**graphs, dynamic=False if not self._dynamic else None)
            if self.fused:
                self._fused_fn = torch.compile(fused_fn, **graphs, dynamic=False)
                self._fused_crop_fn = torch.compile(self._fused_crop_fn, **graphs, dynamic=False)
                if plan_high is not None:
                    self._fused_crop_high_fn = torch.compile(self._fused_crop_high_fn, **graphs, dynamic=False)
            else:
                self._unet_fn = torch.compile(unet_fn, **opts)
                self._decode_fn = torch.compile(decode_fn, **opts)
                # One static graph per bucket and plan: the only form measured faster than
                # the whole decode (H200, batch 8: 8.8 against 15.8 ms; docs/BENCHMARKS.md);
                # the dynamic-batch graph measured no faster inside the step.
                if plan is not None:
                    self._crop_fn = torch.compile(self._crop_fn, **graphs, dynamic=False)
                if plan_high is not None:
                    self._crop_high_fn = torch.compile(self._crop_high_fn, **graphs, dynamic=False)

    @property
    def bucket_sizes(self) -> list[int]:
        return list(self._buckets)

    def bucket(self, n: int) -> int:
        """The batch size a step of ``n`` frames runs at."""
        return next((b for b in self._buckets if b >= n), n)

    # ------------------------------------------------------------------ avatars

    def register_avatar(self, avatar: PreparedAvatar, frames_rgba: np.ndarray | None = None) -> int:
        """Upload what generation needs for ``avatar``; returns the device bytes used.

        ``frames_rgba``: the avatar's frames as (N, H, W, 4) uint8, when the caller holds
        them already: used (only read) by ``step`` instead of composing from RGB.
        """
        n = avatar.num_frames
        if avatar.latents.shape != (n, 8, LATENT_SIZE, LATENT_SIZE):
            raise ValueError(
                f"avatar {avatar.key!r}: latents {avatar.latents.shape}, expected "
                f"({n}, 8, {LATENT_SIZE}, {LATENT_SIZE})"
            )
        if len(avatar.masks) != n or len(avatar.blend_boxes) != n or len(avatar.face_boxes) != n:
            raise ValueError(f"avatar {avatar.key!r}: masks/boxes must have one entry per frame")
        blend = np.asarray(avatar.blend_boxes, dtype=np.int64)
        face = np.asarray(avatar.face_boxes, dtype=np.int64)
        h, w = avatar.height, avatar.width
        bw, bh = blend[:, 2] - blend[:, 0], blend[:, 3] - blend[:, 1]
        if (blend[:, :2] < 0).any() or (blend[:, 2] > w).any() or (blend[:, 3] > h).any() or (
            (bw <= 0) | (bh <= 0)
        ).any():
            raise ValueError(f"avatar {avatar.key!r}: blend boxes must lie inside the {w}x{h} frame")
        if ((face[:, 2] <= face[:, 0]) | (face[:, 3] <= face[:, 1])).any():
            raise ValueError(f"avatar {avatar.key!r}: empty face box")
        boxes = even_boxes(blend, w, h)
        if ((boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])).any():
            raise ValueError(f"avatar {avatar.key!r}: a blend box lies in the frame's odd last row/column")
        hb, wb = int((boxes[:, 3] - boxes[:, 1]).max()), int((boxes[:, 2] - boxes[:, 0]).max())
        crops = np.zeros((n, hb, wb, 3), dtype=np.uint8)
        masks = np.zeros((n, hb, wb), dtype=np.uint8)
        for i in range(n):
            x1, y1, x2, y2 = blend[i]
            m = np.asarray(avatar.masks[i])
            if m.shape != (y2 - y1, x2 - x1):
                raise ValueError(
                    f"avatar {avatar.key!r} frame {i}: mask {m.shape} does not match its "
                    f"blend box {(int(y2 - y1), int(x2 - x1))}"
                )
            ex1, ey1, ex2, ey2 = boxes[i]
            crops[i, : ey2 - ey1, : ex2 - ex1] = avatar.frames[i, ey1:ey2, ex1:ex2]
            # The mask sits at its blend box inside the even box (clipped where the even
            # box had to stop before an odd last row/column).
            my2, mx2 = min(y2, ey2), min(x2, ex2)
            masks[i, y1 - ey1 : my2 - ey1, x1 - ex1 : mx2 - ex1] = m[: my2 - y1, : mx2 - x1]
        if frames_rgba is not None and (frames_rgba.shape != (n, h, w, 4) or frames_rgba.dtype != np.uint8):
            raise ValueError(f"avatar {avatar.key!r}: frames_rgba {frames_rgba.shape} {frames_rgba.dtype}, "
                             f"expected ({n}, {h}, {w}, 4) uint8")
        # A cached avatar's latents are a read-only memory map: torch wants a writable copy.
        dev = _DeviceAvatar(
            key=avatar.key, num_frames=n, width=w, height=h,
            latents=torch.from_numpy(np.require(avatar.latents, requirements="CW")).to(self.device, self.dtype),
            crops=torch.from_numpy(crops).to(self.device),
            masks=torch.from_numpy(masks).to(self.device),
            geometry=torch.from_numpy(np.concatenate([boxes, face], axis=1).astype(np.float32)).to(self.device),
            boxes=boxes, frames_rgb=avatar.frames, frames_rgba=frames_rgba,
        )
        self._avatars[avatar.key] = dev
        return dev.device_bytes

    def unregister_avatar(self, key: str) -> None:
        self._avatars.pop(key, None)

    def has_avatar(self, key: str) -> bool:
        return key in self._avatars

    def device_bytes(self) -> int:
        return sum(av.device_bytes for av in self._avatars.values())

    @torch.inference_mode()
    def measure_crop(self, key: str, frames: int = 4, seed: int = 0, chunk: int = 16) -> dict:
        """Prepare and check the cropped decode for a registered avatar (eager, on the
        caller's stream: the daemon runs it on its low-priority stream, off the worker).

        Records the GroupNorm sums of the rows the crop does not compute from a whole
        decode of every frame with neutral audio (tokens of the positional encoding
        alone), then decodes ``frames`` frames with other, random audio both ways and
        compares the blended boxes (uint8 levels). Returns the figures, with
        ``accepted`` and, when accepted, ``sums`` for ``enable_crop``; never changes the
        avatar itself. With a higher plan (``crop_row_high``) the same again for it,
        where the avatar's blend starts at or below its row and the first plan passed:
        ``high`` holds its figures, and ``sums_high`` its sums when accepted.
        """
        plan = self.crop_plan
        if plan is None:
            raise ValueError("the cropped decode is off (decode = 'full')")
        av = self._avatar(key)
        first_row = cropped_decode.first_visible_row(av.masks, av.geometry)
        figures: dict = {"crop_row": plan.visible_row, "first_visible_row": first_row,
                         "tolerance": self.crop_tolerance, "mode": self.decode_mode}
        unet = self.models.unet
        # Every frame's UNet output with neutral audio (tokens of the positional encoding
        # alone): the decodes each plan records its sums from.
        neutral = stages.tokens_from_windows(torch.zeros((1, 10, 5, AUDIO_DIM), device=self.device,
                                                         dtype=self.dtype))
        neutral_pred = torch.cat([
            stages.unet_step(unet, latents, neutral.expand(len(latents), -1, -1), self._timestep)
            for latents in av.latents.split(chunk)])
        k = min(frames, av.num_frames)
        idx = torch.from_numpy(np.linspace(0, av.num_frames - 1, k).round().astype(np.int64)).to(self.device)
        generator = torch.Generator(device="cpu").manual_seed(seed)
        windows = torch.randn((k, 10, 5, AUDIO_DIM), generator=generator).to(self.device, self.dtype)
        pred = stages.unet_step(unet, av.latents[idx], stages.tokens_from_windows(windows), self._timestep)
        ones = torch.ones(k, device=self.device)
        whole = stages.paste(stages.decode(self.models.vae, pred), av.crops[idx], av.masks[idx], av.geometry[idx],
                             ones)
        checked = self._check_plan(av, plan, first_row, neutral_pred, pred, idx, whole, chunk)
        sums = checked.pop("sums", None)
        figures.update(checked)
        if sums is not None:
            figures["sums"] = sums
        if self.crop_plan_high is not None:
            high_plan = self.crop_plan_high
            if not figures["accepted"]:
                high = {"crop_row": high_plan.visible_row, "accepted": False, "reason": "the first crop plan was refused"}
            else:
                high = {"crop_row": high_plan.visible_row,
                        **self._check_plan(av, high_plan, first_row, neutral_pred, pred, idx, whole, chunk)}
            sums_high = high.pop("sums", None)
            figures["high"] = high
            if sums_high is not None:
                figures["sums_high"] = sums_high
        return figures

    def _check_plan(self, av: _DeviceAvatar, plan: cropped_decode.CropPlan, first_row: int,
                    neutral_pred: torch.Tensor, pred: torch.Tensor, idx: torch.Tensor, whole: torch.Tensor,
                    chunk: int) -> dict:
        """measure_crop for one plan: the avatar's sums under it (from ``neutral_pred``,
        every frame's UNet output with neutral audio), the blended boxes of ``pred``
        (frames ``idx``) decoded under it against ``whole``, the verdict."""
        vae = self.models.vae
        sums = torch.empty((av.num_frames, plan.layers, plan.groups, 2), dtype=torch.float32, device=self.device)
        for start in range(0, av.num_frames, chunk):
            _, sums[start:start + chunk] = cropped_decode.decode_rows(vae, neutral_pred[start:start + chunk], plan,
                                                                      record=True)
        ones = torch.ones(len(idx), device=self.device)
        crop = stages.paste(cropped_decode.decode_to_unit_rows(vae, pred, plan, sums[idx]), av.crops[idx],
                            av.masks[idx], av.geometry[idx], ones)
        diff = (whole.float() - crop.float()).abs()
        mean_abs, max_abs = float(diff.mean()), float(diff.max())
        # Measured either way (the figures say how far off a refused crop is), decided
        # by the rows first: a crop that leaves out rows the blend shows is never used.
        covered, close = first_row >= plan.visible_row, mean_abs <= self.crop_tolerance
        accepted = covered and (close or self.decode_mode == "cropped")
        setting = "decode_crop_row" if plan is self.crop_plan else "decode_crop_row_high"
        if not covered:
            reason = (f"the blend shows face rows from {first_row}, above the crop's first row "
                      f"{plan.visible_row} (lower model.{setting} to {first_row} or less)")
        elif not close:
            reason = (f"the cropped decode's blended box is off by {mean_abs:.3f} levels on average, more "
                      f"than model.decode_tolerance {self.crop_tolerance:g}"
                      + ("; used anyway (model.decode = 'cropped')" if accepted else ""))
        else:
            reason = None
        out = {"accepted": accepted, "mean_abs": round(mean_abs, 4), "max_abs": round(max_abs, 2), "reason": reason}
        if accepted:
            out["sums"] = sums
        return out

    def enable_crop(self, key: str, sums: torch.Tensor, sums_high: torch.Tensor | None = None) -> None:
        """Use the cropped decode for ``key``'s frames (``measure_crop``'s sums; with
        ``sums_high``, the higher plan's too)."""
        av = self._avatar(key)
        for plan, s, name in ((self.crop_plan, sums, "plan"), (self.crop_plan_high, sums_high, "higher plan")):
            if s is not None and (plan is None or tuple(s.shape) != (av.num_frames, plan.layers, plan.groups, 2)):
                raise ValueError(f"avatar {key!r}: group sums {tuple(s.shape)} do not fit its frames and the {name}")
        if sums is None:
            raise ValueError(f"avatar {key!r}: the first plan's group sums are needed")
        av.gn_sums, av.gn_sums_high = sums, sums_high

    def decoder_flops(self, cropped: bool, high: bool = False) -> float:
        """The decoder's FLOPs per frame, whole or under the crop plan (``high``: the
        higher one)."""
        chosen = self.crop_plan_high if high else self.crop_plan
        plan = chosen if cropped and chosen is not None else cropped_decode.plan_crop(self.models.vae.decoder, 0)
        return cropped_decode.decoder_flops(self.models.vae, plan)

    def idle_frame(self, avatar_key: str, index: int) -> np.ndarray:
        """The avatar's own frame as RGBA (host copy; no device work)."""
        av = self._avatar(avatar_key)
        return self._rgba(av, index % av.num_frames)

    @staticmethod
    def _rgba(av: _DeviceAvatar, index: int) -> np.ndarray:
        if av.frames_rgba is not None:
            return av.frames_rgba[index].copy()
        frame = np.empty((av.height, av.width, 4), dtype=np.uint8)
        frame[..., :3] = av.frames_rgb[index]
        frame[..., 3] = 255
        return frame

    def _avatar(self, key: str) -> _DeviceAvatar:
        try:
            return self._avatars[key]
        except KeyError:
            raise KeyError(f"avatar {key!r} is not registered with the engine") from None

    # ------------------------------------------------------------------ generation

    @torch.inference_mode()
    def warmup(self, box: int = 300, frame: int = 512) -> dict[int, float]:
        """Run whole steps (``launch``: UNet, decode, paste, I420, copy-out) once per batch
        size a step can use (every bucket on CUDA: compilation, CUDA-graph recording and
        cuDNN's algorithm search happen here), so that the first sessions do not pay for them, on a
        synthetic avatar with ``box``-pixel boxes in ``frame``-pixel frames (the paste
        costs what a real avatar's does). Returns ms per step at each size, measured after
        the warm-up, host time from launch to the boxes on the host (the frames/s the
        device sustains follows from it). ``warmup_device_ms`` keeps each size's device time
        (from its start on the stream to the end of its copy-out, median of the three), the
        measure live steps report with ``gpu_seconds``."""
        if self._buckets:
            sizes = self._buckets
        else:  # a CPU: enough to seed the step-time estimates, cheaply
            sizes = sorted({1, min(4, self.max_batch)})
        key = "\x00warmup"
        self.register_avatar(_synthetic_avatar(key, box, frame))
        timings: dict[int, float] = {}

        def zeros(plan: cropped_decode.CropPlan) -> torch.Tensor:
            return torch.zeros((2, plan.layers, plan.groups, 2), device=self.device)

        forms: list[tuple[torch.Tensor | None, torch.Tensor | None]] = [(None, None)]  # whole decode, then crops
        if self.crop_plan is not None:
            forms.append((zeros(self.crop_plan), None))
        if self.crop_plan_high is not None:
            forms.append((zeros(self.crop_plan), zeros(self.crop_plan_high)))
        try:
            for size in sizes:
                tokens = torch.randn(size, AUDIO_TOKENS, AUDIO_DIM, device=self.device, dtype=self.dtype)
                if self.compiled and self._dynamic and size >= 2:
                    self._mark_dynamic = size
                args = ([key] * size, [i % 2 for i in range(size)], tokens, [1.0] * size)
                av = self._avatars[key]
                # Every decode gets compiled and recorded; the steps are timed with the last,
                # the one most batches take (the highest crop plan there is).
                for av.gn_sums, av.gn_sums_high in forms:
                    for _ in range(3 if self.compiled else 1):  # graphs are recorded on a later call
                        self.launch(*args).boxes()
                t = time.perf_counter()
                device_s = []
                for _ in range(3):
                    handle = self.launch(*args)
                    handle.boxes()
                    device_s.append(handle.gpu_seconds())
                timings[size] = (time.perf_counter() - t) / 3 * 1000
                if all(s is not None for s in device_s):
                    self.warmup_device_ms[size] = statistics.median(device_s) * 1000
        finally:
            self._mark_dynamic = 0
            self.unregister_avatar(key)
        return timings

    def _check(self, keys: list[str], indices: list[int]) -> None:
        for key, index in zip(keys, indices):
            av = self._avatar(key)
            if not 0 <= index < av.num_frames:
                raise IndexError(f"avatar {key!r}: frame_index {index} outside 0..{av.num_frames - 1}")

    def _upload(self, array: np.ndarray) -> torch.Tensor:
        """A small host array on the device without a blocking copy (pinned staging)."""
        t = torch.from_numpy(np.ascontiguousarray(array))
        if self.device.type != "cuda":
            return t
        return t.pin_memory().to(self.device, non_blocking=True)

    @torch.inference_mode()
    def _generate(self, keys: list[str], indices: list[int], tokens: torch.Tensor, blends: np.ndarray,
                  timed: bool = False):
        """UNet -> decode -> paste for one batch; returns the (n, Hb, Wb, 3) RGB boxes."""
        n = len(keys)
        size = self.bucket(n)
        pad = size - n
        order: dict[str, tuple[list[int], list[int]]] = {}
        for pos, (key, index) in enumerate(zip(keys, indices)):
            p, i = order.setdefault(key, ([], []))
            p.append(pos)
            i.append(index)
        if pad:  # bucket padding repeats the last frame
            order[keys[-1]][0].extend(range(n, size))
            order[keys[-1]][1].extend([indices[-1]] * pad)
        flat = np.concatenate([np.concatenate([np.asarray(p), np.asarray(i)]) for p, i in order.values()])
        index_dev = self._upload(flat.astype(np.int64))
        blend_dev = self._upload(np.asarray(blends, dtype=np.float32))
        if pad:
            tokens = torch.cat([tokens, tokens[-1:].expand(pad, -1, -1)])
        tokens = tokens.to(self.dtype)
        timing = (self.record_timings or timed) and self.device.type == "cuda"
        if timing:
            events = [torch.cuda.Event(enable_timing=True) for _ in range(4)]
            events[0].record()
        if self.compiled:
            torch.compiler.cudagraph_mark_step_begin()
        latents = torch.empty((size, 8, LATENT_SIZE, LATENT_SIZE), dtype=self.dtype, device=self.device)
        groups = []
        offset = 0
        for key, (p, _) in order.items():
            k = len(p)
            pos, idx = index_dev[offset : offset + k], index_dev[offset + k : offset + 2 * k]
            offset += 2 * k
            av = self._avatars[key]
            latents[pos] = av.latents[idx]
            groups.append((av, pos, idx))
        if self._mark_dynamic:
            # Compile once for every batch size (the first call traces with these marks).
            torch._dynamo.mark_dynamic(latents, 0, min=2, max=max(2, self.max_batch))
            torch._dynamo.mark_dynamic(tokens, 0, min=2, max=max(2, self.max_batch))
        sums = None
        high = self.crop_plan_high is not None and all(av.gn_sums_high is not None for av, _, _ in groups)
        if high or (self.crop_plan is not None and all(av.gn_sums is not None for av, _, _ in groups)):
            plan = self.crop_plan_high if high else self.crop_plan
            sums = torch.empty((size, plan.layers, plan.groups, 2), dtype=torch.float32, device=self.device)
            for av, pos, idx in groups:
                sums[pos] = (av.gn_sums_high if high else av.gn_sums)[idx]
        if self.fused:  # one graph: its device time is counted as the UNet's, decode 0
            fused_crop = self._fused_crop_high_fn if high else self._fused_crop_fn
            image = (self._fused_fn(latents, tokens) if sums is None else fused_crop(latents, tokens, sums))[:n]
            self._unet_queued_at = time.perf_counter()
            if timing:
                events[1].record()
        else:
            pred = self._unet_fn(latents, tokens)
            self._unet_queued_at = time.perf_counter()
            if timing:
                events[1].record()
            crop_fn = self._crop_high_fn if high else self._crop_fn
            image = (self._decode_fn(pred) if sums is None else crop_fn(pred, sums))[:n]
        if timing:
            events[2].record()
        hb = max(av.crops.shape[1] for av, _, _ in groups)
        wb = max(av.crops.shape[2] for av, _, _ in groups)
        base = torch.zeros((n, hb, wb, 3), dtype=torch.uint8, device=self.device)
        mask = torch.zeros((n, hb, wb), dtype=torch.uint8, device=self.device)
        geom = torch.zeros((n, 8), dtype=torch.float32, device=self.device)
        for av, pos, idx in groups:
            if pad and av.key == keys[-1]:
                pos, idx = pos[:-pad], idx[:-pad]
            base[pos, : av.crops.shape[1], : av.crops.shape[2]] = av.crops[idx]
            mask[pos, : av.masks.shape[1], : av.masks.shape[2]] = av.masks[idx]
            geom[pos] = av.geometry[idx]
        boxes = stages.paste(image, base, mask, geom, blend_dev[:n])
        if timing:
            events[3].record()
        return boxes, (events if timing else None)

    def _record(self, events, end: "torch.cuda.Event") -> None:
        end.synchronize()
        self.last_timings_ms = _stage_ms(events, end)

    @torch.inference_mode()
    def launch(self, keys: list[str], indices: list[int], tokens: torch.Tensor | np.ndarray,
               blends: list[float] | np.ndarray, timed: bool = False) -> Launched:
        """Start one step for ``len(keys)`` frames (avatar key, avatar frame index, its
        [50, 384] tokens, its blend); the I420 boxes come back through the handle. At most
        ``max_batch`` frames. Never waits for the device (``record_timings`` does: it
        fills ``last_timings_ms``); ``timed`` records the stages' device times for the
        handle's ``stage_ms`` without waiting."""
        n = len(keys)
        if not 0 < n <= self.max_batch:
            raise ValueError(f"a step takes 1..{self.max_batch} frames, got {n}")
        self._check(keys, indices)
        tokens = torch.as_tensor(tokens)
        if tuple(tokens.shape) != (n, AUDIO_TOKENS, AUDIO_DIM):
            raise ValueError(f"tokens must be ({n}, {AUDIO_TOKENS}, {AUDIO_DIM}), got {tuple(tokens.shape)}")
        tokens = tokens.to(self.device, non_blocking=True)
        t0 = time.perf_counter()
        start = None
        if self._copy_stream is not None:
            start = torch.cuda.Event(enable_timing=True)
            start.record()
        rgb, events = self._generate(keys, indices, tokens, np.asarray(blends, dtype=np.float32), timed)
        packed = pack_i420(*rgb_to_i420_planes(rgb))
        _, hb, wb, _ = rgb.shape
        boxes = np.stack([self._avatars[k].boxes[i] for k, i in zip(keys, indices)])
        if self._copy_stream is None:
            return Launched(keys, indices, boxes, packed, hb, wb, None, seconds=time.perf_counter() - t0,
                            unet_queued_at=self._unet_queued_at)
        host = torch.empty(packed.shape, dtype=torch.uint8, pin_memory=True)
        self._copy_stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._copy_stream):
            host.copy_(packed, non_blocking=True)
            done = torch.cuda.Event(enable_timing=True)
            done.record(self._copy_stream)
        packed.record_stream(self._copy_stream)
        if events is not None and self.record_timings:
            self._record(events, done)
        return Launched(keys, indices, boxes, host, hb, wb, done, start, stage_events=events,
                        unet_queued_at=self._unet_queued_at)

    def step(self, jobs: list[FrameJob]) -> list[np.ndarray]:
        """Generate one full RGBA frame (H, W, 4) uint8 per job, in order (offline path)."""
        for job in jobs:
            if np.shape(job.audio_tokens) != (AUDIO_TOKENS, AUDIO_DIM):
                raise ValueError(
                    f"audio_tokens must be ({AUDIO_TOKENS}, {AUDIO_DIM}), got {np.shape(job.audio_tokens)}"
                )
        self._check([j.avatar_key for j in jobs], [j.frame_index for j in jobs])
        out: list[np.ndarray] = []
        for start in range(0, len(jobs), self.max_batch):
            out.extend(self._run_batch(jobs[start : start + self.max_batch]))
        return out

    @torch.inference_mode()
    def _run_batch(self, jobs: list[FrameJob]) -> list[np.ndarray]:
        if not jobs:
            return []
        keys, indices = [j.avatar_key for j in jobs], [j.frame_index for j in jobs]
        tokens = self._upload(np.stack([j.audio_tokens for j in jobs]).astype(np.float32))
        rgb, events = self._generate(keys, indices, tokens, np.array([float(j.blend) for j in jobs], np.float32))
        if self.device.type == "cuda":
            host_t = torch.empty(rgb.shape, dtype=torch.uint8, pin_memory=True)
            host_t.copy_(rgb, non_blocking=True)
            done = torch.cuda.Event(enable_timing=events is not None)
            done.record()
            if events is not None:
                self._record(events, done)
            done.synchronize()
            host = host_t.numpy()
        else:
            host = rgb.numpy()
        frames = []
        for b, job in enumerate(jobs):
            av = self._avatars[job.avatar_key]
            frame = self._rgba(av, job.frame_index)
            x1, y1, x2, y2 = av.boxes[job.frame_index]
            frame[y1:y2, x1:x2, :3] = host[b, : y2 - y1, : x2 - x1]
            frames.append(frame)
        return frames


def _stage_ms(events: list, end: "torch.cuda.Event") -> dict[str, float]:
    """Device ms between a step's stage events (start, after the UNet, the decode, the
    paste) and the end of its copy-out."""
    names = ("unet", "vae_decode", "paste")
    ms = {name: events[i].elapsed_time(events[i + 1]) for i, name in enumerate(names)}
    ms["copy_out"] = events[3].elapsed_time(end)
    ms["total"] = events[0].elapsed_time(end)
    return ms


def _synthetic_avatar(key: str, box: int, frame: int) -> PreparedAvatar:
    """Two frames of a plain avatar with a ``box``-pixel blend box: for warm-up only."""
    n = 2
    box = min(box, frame)
    x1 = (frame - box) // 2
    face = (x1 + box // 6, x1 + box // 6, x1 + box - box // 6, x1 + box - box // 6)
    mask = np.zeros((box, box), np.uint8)
    mask[box // 2 :] = 255
    return PreparedAvatar(
        key=key, fps=25.0, frames=np.full((n, frame, frame, 3), 128, np.uint8),
        face_boxes=np.array([face] * n, np.int32), blend_boxes=np.array([(x1, x1, x1 + box, x1 + box)] * n, np.int32),
        masks=[mask] * n, latents=np.zeros((n, 8, LATENT_SIZE, LATENT_SIZE), np.float32),
    )
