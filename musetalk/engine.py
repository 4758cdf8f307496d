"""The per-step generator: a batch of frame jobs of any mix of avatars -> RGBA frames.

One step = gather latents -> UNet (timestep 0, cross-attention on the audio tokens)
-> VAE decode -> resize each 256x256 face to its face box and blend it into its blend
box with the avatar's soft mask (scaled by the job's ``blend``), all on the device.

Memory layout (a deliberate split):
- on the device, per avatar: latents (N, 8, 32, 32), and for paste-back only the
  blend-box region of every frame and its mask, zero-padded to the avatar's largest
  box (N, Hb, Wb, 3) / (N, Hb, Wb). That is what the blend reads; full frames would
  cost 5-20x more device memory per avatar (1080p: ~1.5 GB for 10 s) for nothing.
- on the host: the full idle frames, already RGBA. The device returns only the
  blended box (through a reused pinned buffer) and the host copies it into a fresh
  copy of the idle frame. No blending happens on the host, and every pixel outside
  the blend box is the idle frame's own byte, by construction.

Audio tokens arrive with MuseTalk's sinusoidal positional encoding already added
(``musetalk.audio.frame_tokens``); the engine adds nothing to them.

Inference runs under ``torch.inference_mode()``; the class never touches asyncio.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from musetalk.models import MuseTalkModels
from musetalk.types import AUDIO_DIM, AUDIO_TOKENS, LATENT_SIZE, FrameJob, PreparedAvatar
from musetalk.vae import decode_to_unit

log = logging.getLogger(__name__)


@dataclass
class _DeviceAvatar:
    key: str
    num_frames: int
    latents: torch.Tensor  # (N, 8, 32, 32) model dtype, device
    crops: torch.Tensor  # (N, Hb, Wb, 3) uint8, device: blend-box pixels of each frame
    masks: torch.Tensor  # (N, Hb, Wb) uint8, device
    geometry: torch.Tensor  # (N, 8) float32, device: blend box then face box (x1, y1, x2, y2)
    blend_boxes: np.ndarray  # (N, 4) int, host
    frames_rgba: np.ndarray  # (N, H, W, 4) uint8, host

    @property
    def device_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.latents, self.crops, self.masks))


def _buckets(max_batch: int) -> list[int]:
    sizes, b = [], 1
    while b < max_batch:
        sizes.append(b)
        b *= 2
    sizes.append(max_batch)
    return sizes


class Engine:
    """Batched MuseTalk generation across avatars on one device.

    ``compile=True`` (CUDA only) wraps the UNet and the VAE decode in
    ``torch.compile(mode="reduce-overhead")`` (CUDA graphs) and pads each batch up to
    a bucket size (powers of two up to ``max_batch``) so that graphs are reused;
    each bucket compiles on first use (about a minute on an H100).
    """

    def __init__(
        self,
        models: MuseTalkModels,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        compile: bool = False,
        max_batch: int = 32,
        channels_last: bool = False,
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
        if channels_last:
            models.unet.to(memory_format=torch.channels_last)
            models.vae.to(memory_format=torch.channels_last)
        self._buckets = _buckets(max_batch)
        self._avatars: dict[str, _DeviceAvatar] = {}
        self._timestep = torch.zeros((), dtype=torch.long, device=self.device)
        self._pinned: torch.Tensor | None = None
        self.record_timings = False
        self.last_timings_ms: dict[str, float] = {}

        unet, vae, timestep = models.unet, models.vae, self._timestep

        def unet_fn(latents: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
            return unet(latents, timestep, encoder_hidden_states=audio).sample

        def decode_fn(latents: torch.Tensor) -> torch.Tensor:
            return decode_to_unit(vae, latents)

        self._unet_fn, self._decode_fn = unet_fn, decode_fn
        if self.compiled:
            self._unet_fn = torch.compile(unet_fn, mode="reduce-overhead", dynamic=False)
            self._decode_fn = torch.compile(decode_fn, mode="reduce-overhead", dynamic=False)

    # ------------------------------------------------------------------ avatars

    def register_avatar(self, avatar: PreparedAvatar, frames_rgba: np.ndarray | None = None) -> int:
        """Upload what generation needs for ``avatar``; returns the device bytes used.

        ``frames_rgba``: the avatar's frames as (N, H, W, 4) uint8, when the caller holds
        them already (the daemon does, for its idle frames): shared instead of a second
        host copy. Only read.
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
        hb, wb = int(bh.max()), int(bw.max())
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
            crops[i, : y2 - y1, : x2 - x1] = avatar.frames[i, y1:y2, x1:x2]
            masks[i, : y2 - y1, : x2 - x1] = m
        if frames_rgba is not None:
            if frames_rgba.shape != (n, h, w, 4) or frames_rgba.dtype != np.uint8:
                raise ValueError(f"avatar {avatar.key!r}: frames_rgba {frames_rgba.shape} {frames_rgba.dtype}, "
                                 f"expected ({n}, {h}, {w}, 4) uint8")
            rgba = frames_rgba
        else:
            rgba = np.empty((n, h, w, 4), dtype=np.uint8)
            rgba[..., :3] = avatar.frames
            rgba[..., 3] = 255
        dev = _DeviceAvatar(
            key=avatar.key,
            num_frames=n,
            latents=torch.from_numpy(np.ascontiguousarray(avatar.latents)).to(self.device, self.dtype),
            crops=torch.from_numpy(crops).to(self.device),
            masks=torch.from_numpy(masks).to(self.device),
            geometry=torch.from_numpy(np.concatenate([blend, face], axis=1).astype(np.float32)).to(
                self.device
            ),
            blend_boxes=blend,
            frames_rgba=rgba,
        )
        self._avatars[avatar.key] = dev
        return dev.device_bytes

    def unregister_avatar(self, key: str) -> None:
        self._avatars.pop(key, None)

    def has_avatar(self, key: str) -> bool:
        return key in self._avatars

    def idle_frame(self, avatar_key: str, index: int) -> np.ndarray:
        """The avatar's own frame as RGBA (host copy; no device work)."""
        av = self._avatar(avatar_key)
        return av.frames_rgba[index % av.num_frames].copy()

    def _avatar(self, key: str) -> _DeviceAvatar:
        try:
            return self._avatars[key]
        except KeyError:
            raise KeyError(f"avatar {key!r} is not registered with the engine") from None

    # ------------------------------------------------------------------ generation

    @torch.inference_mode()
    def warmup(self) -> list[int]:
        """Run the UNet and the decoder once per batch size a step can use (every bucket
        when compiled: this is where compilation happens), so that the first sessions do
        not pay for kernel selection or compilation. Returns the sizes run."""
        sizes = self._buckets if self.compiled else sorted({1, min(8, self.max_batch), self.max_batch})
        for size in sizes:
            if self.compiled:
                torch.compiler.cudagraph_mark_step_begin()
            latents = torch.randn(size, 8, LATENT_SIZE, LATENT_SIZE, device=self.device, dtype=self.dtype)
            audio = torch.randn(size, AUDIO_TOKENS, AUDIO_DIM, device=self.device, dtype=self.dtype)
            for _ in range(2 if self.compiled else 1):  # graphs are recorded on a later call
                self._decode_fn(self._unet_fn(latents, audio))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return list(sizes)

    def step(self, jobs: list[FrameJob]) -> list[np.ndarray]:
        """Generate one RGBA frame (H, W, 4) uint8 per job, in order."""
        for job in jobs:
            av = self._avatar(job.avatar_key)
            if not 0 <= job.frame_index < av.num_frames:
                raise IndexError(
                    f"avatar {job.avatar_key!r}: frame_index {job.frame_index} outside "
                    f"0..{av.num_frames - 1}"
                )
            if np.shape(job.audio_tokens) != (AUDIO_TOKENS, AUDIO_DIM):
                raise ValueError(
                    f"audio_tokens must be ({AUDIO_TOKENS}, {AUDIO_DIM}), got {np.shape(job.audio_tokens)}"
                )
        out: list[np.ndarray] = []
        for start in range(0, len(jobs), self.max_batch):
            out.extend(self._run_batch(jobs[start : start + self.max_batch]))
        return out

    @torch.inference_mode()
    def _run_batch(self, jobs: list[FrameJob]) -> list[np.ndarray]:
        n = len(jobs)
        if n == 0:
            return []
        padded = list(jobs)
        if self.compiled:
            size = next(b for b in self._buckets if b >= n)
            padded += [jobs[-1]] * (size - n)
        timing = self.record_timings and self.device.type == "cuda"
        if timing:
            events = [torch.cuda.Event(enable_timing=True) for _ in range(5)]
            events[0].record()
        if self.compiled:
            torch.compiler.cudagraph_mark_step_begin()

        groups = self._group(padded)
        latents = torch.empty(
            (len(padded), 8, LATENT_SIZE, LATENT_SIZE), dtype=self.dtype, device=self.device
        )
        for av, pos, idx in groups:
            latents[pos] = av.latents[idx]
        audio = torch.from_numpy(np.stack([j.audio_tokens for j in padded]).astype(np.float32))
        if self.device.type == "cuda":
            audio = audio.pin_memory().to(self.device, non_blocking=True)
        audio = audio.to(self.device, self.dtype)

        pred = self._unet_fn(latents, audio)
        if timing:
            events[1].record()
        image = self._decode_fn(pred)
        if timing:
            events[2].record()
        boxes = self._paste(image[:n], groups, jobs)
        if timing:
            events[3].record()
        frames = self._compose(boxes, jobs)
        if timing:
            events[4].record()
            events[4].synchronize()
            names = ("unet", "vae_decode", "paste", "copy_out")
            self.last_timings_ms = {
                name: events[i].elapsed_time(events[i + 1]) for i, name in enumerate(names)
            }
            self.last_timings_ms["total"] = events[0].elapsed_time(events[4])
        return frames

    def _group(self, jobs: list[FrameJob]):
        """(avatar, batch positions, frame indices) per avatar present in ``jobs``."""
        by_key: dict[str, tuple[list[int], list[int]]] = {}
        for pos, job in enumerate(jobs):
            p, i = by_key.setdefault(job.avatar_key, ([], []))
            p.append(pos)
            i.append(job.frame_index)
        return [
            (
                self._avatars[key],
                torch.tensor(p, device=self.device),
                torch.tensor(i, device=self.device),
            )
            for key, (p, i) in by_key.items()
        ]

    def _paste(self, image: torch.Tensor, groups, jobs: list[FrameJob]) -> torch.Tensor:
        """Blend each decoded face into its blend box: (B, Hb, Wb, 4) RGBA uint8, on the device."""
        n = image.shape[0]
        hb = max(av.crops.shape[1] for av, _, _ in groups)
        wb = max(av.crops.shape[2] for av, _, _ in groups)
        orig = torch.zeros((n, hb, wb, 3), dtype=torch.uint8, device=self.device)
        mask = torch.zeros((n, hb, wb), dtype=torch.uint8, device=self.device)
        geom = torch.zeros((n, 8), dtype=torch.float32, device=self.device)
        for av, pos, idx in groups:
            keep = pos < n  # drop bucket padding
            pos, idx = pos[keep], idx[keep]
            orig[pos, : av.crops.shape[1], : av.crops.shape[2]] = av.crops[idx]
            mask[pos, : av.masks.shape[1], : av.masks.shape[2]] = av.masks[idx]
            geom[pos] = av.geometry[idx]
        blend = torch.tensor([float(j.blend) for j in jobs], device=self.device).clamp_(0, 1)

        # The reference quantizes the decoded face to uint8 before resizing it.
        face = (torch.nan_to_num(image.float(), nan=0.5) * 255).round()

        # Face-crop coordinates of every blend-box pixel; the half-pixel mapping of
        # grid_sample(align_corners=False, border) is cv2.resize's INTER_LINEAR mapping.
        bx1, by1, fx1, fy1 = geom[:, 0], geom[:, 1], geom[:, 4], geom[:, 5]
        fw, fh = geom[:, 6] - fx1, geom[:, 7] - fy1
        u = torch.arange(wb, device=self.device, dtype=torch.float32)
        v = torch.arange(hb, device=self.device, dtype=torch.float32)
        fx = (bx1 - fx1)[:, None] + u[None, :]  # (B, Wb)
        fy = (by1 - fy1)[:, None] + v[None, :]  # (B, Hb)
        gx = (2 * (fx + 0.5) / fw[:, None] - 1)[:, None, :].expand(n, hb, wb)
        gy = (2 * (fy + 0.5) / fh[:, None] - 1)[:, :, None].expand(n, hb, wb)
        grid = torch.stack([gx, gy], dim=-1)
        resized = F.grid_sample(
            face, grid, mode="bilinear", padding_mode="border", align_corners=False
        ).round().permute(0, 2, 3, 1)
        inside = ((fx >= 0) & (fx < fw[:, None]))[:, None, :] & ((fy >= 0) & (fy < fh[:, None]))[:, :, None]
        weight = (mask.float() / 255.0) * blend[:, None, None] * inside
        weight = weight[..., None]
        base = orig.float()
        mixed = torch.lerp(base, resized, weight).round().clamp_(0, 255)
        # Where the weight is zero the result must be the idle pixel itself.
        rgb = torch.where(weight > 0, mixed, base).to(torch.uint8)
        # RGBA, so that the host writes whole 4-byte pixels into the RGBA frame (a
        # strided 3-of-4-channel copy is ~7x slower on the host).
        alpha = torch.full((n, hb, wb, 1), 255, dtype=torch.uint8, device=self.device)
        return torch.cat([rgb, alpha], dim=-1)

    def _compose(self, boxes: torch.Tensor, jobs: list[FrameJob]) -> list[np.ndarray]:
        if self.device.type == "cuda":
            if self._pinned is None or self._pinned.numel() < boxes.numel():
                self._pinned = torch.empty(boxes.numel(), dtype=torch.uint8, pin_memory=True)
            host_t = self._pinned[: boxes.numel()].view(boxes.shape)
            host_t.copy_(boxes, non_blocking=True)
            torch.cuda.current_stream(self.device).synchronize()
            host = host_t.numpy()
        else:
            host = boxes.numpy()
        frames = []
        for b, job in enumerate(jobs):
            av = self._avatars[job.avatar_key]
            frame = av.frames_rgba[job.frame_index].copy()
            x1, y1, x2, y2 = av.blend_boxes[job.frame_index]
            frame[y1:y2, x1:x2] = host[b, : y2 - y1, : x2 - x1]
            frames.append(frame)
        return frames
