"""A VAE decode that computes only the face rows the blend can show.

The blend mask of MuseTalk 1.5 is zero over the upper half of the blend square, so of
the 256 decoded rows only those from about 100 down ever reach a viewer. The decoder's
32x32 stages (``conv_in``, the mid block, the first up block's resnets) run whole; from
64x64 on each stage runs on the rows below a start row: enough rows above the first
visible one for the convolutions' reach (one row per 3x3 convolution in the stage;
nearest upsampling doubles rows), so the rows that reach the output are computed from
true values. Rows at the top of a crop read the convolution's zero padding and are wrong
("contaminated"); they are never used for statistics and are cut before the next stage.

GroupNorm needs its statistics over the whole map. The rows not computed contribute
cached sums: per avatar frame and per GroupNorm layer, the per-group sum and sum of
squares of those rows, taken from a whole decode of that frame with neutral audio
(``record_group_sums``). A mouth that moves changes those upper rows a little, so the
crop is not exact by construction: the daemon measures it per avatar (``validate``)
and uses it only where the blended box stays within its bound.

``CropPlan`` holds the row arithmetic; ``decode_rows`` runs the decoder with a plan
(whole rows, or cropped with cached sums, or whole while recording the sums).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from musetalk.subpixel import SubpixelUpsample, covers


@dataclass(frozen=True)
class CropPlan:
    """Which rows each decoder stage computes, for output rows from ``visible_row`` on.

    ``starts[s]`` is the first row computed at the input of stage ``s`` (stage 0 is the
    latent resolution and always whole); ``boundaries[l]`` the rows of GroupNorm layer
    ``l`` (in decoder order, from stage 1 on) whose statistics come from the cache.
    """

    visible_row: int
    height: int  # output rows (256 for MuseTalk)
    starts: tuple[int, ...]
    boundaries: tuple[int, ...]
    groups: int

    @property
    def layers(self) -> int:
        return len(self.boundaries)

    @property
    def cropped(self) -> bool:
        return self.visible_row > 0


def _stages(decoder: nn.Module) -> list[tuple[nn.Module, list[nn.Module], bool]]:
    """Stages from the first upsampling on: (the upsampler that opens the stage: nearest
    2x + a 3x3 convolution, as diffusers' ``Upsample2D`` or ``musetalk.subpixel``'s
    equivalent; the resnets at that resolution; whether the output conv closes it)."""
    ups = list(decoder.up_blocks)
    out = []
    for s in range(1, len(ups)):
        upsamplers = ups[s - 1].upsamplers
        if upsamplers is None or len(upsamplers) != 1:
            raise ValueError("cropped decode needs one upsampler between the decoder's up blocks")
        up = upsamplers[0]
        if not (isinstance(up, SubpixelUpsample) or covers(up)):
            raise ValueError("cropped decode needs nearest 2x upsamplers with a 3x3 convolution")
        out.append((up, list(ups[s].resnets), s == len(ups) - 1))
    if ups[-1].upsamplers is not None:
        raise ValueError("cropped decode needs a last up block without an upsampler")
    return out


def _check_decoder(decoder: nn.Module) -> None:
    norms = [decoder.conv_norm_out] + [m for _, resnets, _ in _stages(decoder) for r in resnets
                                       for m in (r.norm1, r.norm2)]
    if not all(isinstance(n, nn.GroupNorm) for n in norms):
        raise ValueError("cropped decode needs GroupNorm layers (a VAE without spatial norm)")
    for _, resnets, _ in _stages(decoder):
        for r in resnets:
            if r.upsample is not None or r.downsample is not None or r.time_emb_proj is not None:
                raise ValueError("cropped decode needs plain decoder resnets")


def plan_crop(decoder: nn.Module, visible_row: int, latent_rows: int = 32) -> CropPlan:
    """The start rows for output rows ``visible_row``.. of a decoder of ``latent_rows``
    latents: each stage starts as many rows above the rows its output needs as it has
    3x3 convolutions (each reaches one row up); ``visible_row`` 0 is the whole decode."""
    _check_decoder(decoder)
    stages = _stages(decoder)
    height = latent_rows * 2 ** len(stages)
    if not 0 <= visible_row < height:
        raise ValueError(f"visible_row {visible_row} must be 0..{height - 1}")
    convs = [1 + 2 * len(resnets) + (1 if last else 0) for _, resnets, last in stages]
    starts = [0] * (len(stages) + 1)
    need = visible_row
    for s in range(len(stages), 0, -1):
        # Even: the upsampled rows of the previous stage then begin exactly here (no
        # one-row slice, which would make the convolution's input a strided copy).
        starts[s] = max(0, need - convs[s - 1]) // 2 * 2
        need = starts[s] // 2
    # The GroupNorm boundaries: the first row of each layer's input that is computed
    # from true values (the start plus the contaminated rows above it).
    boundaries = []
    for s, (_, resnets, last) in enumerate(stages, start=1):
        bad = 1 if starts[s] > 0 else 0  # the stage's upsampler conv
        for _ in resnets:
            boundaries.append(starts[s] + bad)  # norm1
            bad += 1 if starts[s] > 0 else 0
            boundaries.append(starts[s] + bad)  # norm2
            bad += 1 if starts[s] > 0 else 0
        if last:
            boundaries.append(starts[s] + bad)  # conv_norm_out
    return CropPlan(visible_row=visible_row, height=height, starts=tuple(starts), boundaries=tuple(boundaries),
                    groups=int(decoder.conv_norm_out.num_groups))


def _group_sums(x: torch.Tensor, groups: int, rows: int) -> torch.Tensor:
    """(B, G, 2) float32: per-group sum and sum of squares over ``x``'s first ``rows`` rows."""
    b, c = x.shape[:2]
    part = x[:, :, :rows].float().reshape(b, groups, -1)
    return torch.stack([part.sum(-1), (part * part).sum(-1)], dim=-1)


def _cropped_group_norm(gn: nn.GroupNorm, x: torch.Tensor, skip: int, full_rows: int,
                        cached: torch.Tensor) -> torch.Tensor:
    """GroupNorm of a crop whose statistics are completed by the cached sums of the rows
    not computed; the crop's first ``skip`` rows (contaminated) are left out of them.

    Sums per channel first (a reduction over rows and columns, which keeps the
    channels-last layout), then per group; the normalisation is one multiply-add per
    channel. No reshaped copy of the activations is made."""
    b, c = x.shape[:2]
    g = gn.num_groups
    per = c // g
    part = x[:, :, skip:].float()
    s1 = part.sum(dim=(2, 3)).view(b, g, per).sum(-1) + cached[..., 0]
    s2 = (part * part).sum(dim=(2, 3)).view(b, g, per).sum(-1) + cached[..., 1]
    count = per * full_rows * x.shape[3]
    mean = s1 / count
    inv = torch.rsqrt((s2 / count - mean * mean).clamp_min(0.0) + gn.eps)
    scale = inv.repeat_interleave(per, dim=1) * gn.weight.float()
    shift = gn.bias.float() - mean.repeat_interleave(per, dim=1) * scale
    return (x.float() * scale[:, :, None, None] + shift[:, :, None, None]).to(x.dtype)


def decode_rows(vae: nn.Module, latents: torch.Tensor, plan: CropPlan, sums: torch.Tensor | None = None,
                record: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run the decoder on scaled latents (B, 4, h, w) and return the image rows from
    ``plan.visible_row`` on, (B, 3, height - visible_row, width), in [-1, 1] like the
    decoder's output.

    Three ways: whole (``plan.visible_row`` 0, ``sums`` None): the decoder itself, layer
    for layer; cropped (``sums`` (B, layers, G, 2) float32 from ``record``); or
    ``record=True``: the whole decode, which also returns the sums the cropped one needs
    (the GroupNorm inputs' rows above each boundary of ``plan``).
    """
    decoder = vae.decoder
    z = latents / vae.config.scaling_factor
    if vae.post_quant_conv is not None:
        z = vae.post_quant_conv(z)
    x = decoder.conv_in(z)
    x = decoder.mid_block(x, None)
    for r in decoder.up_blocks[0].resnets:
        x = r(x, None)
    crop = plan.cropped and not record
    if crop and sums is None:
        raise ValueError("a cropped decode needs the avatar frames' cached group sums")
    recorded: list[torch.Tensor] = []
    layer = 0

    def norm(gn: nn.GroupNorm, x: torch.Tensor, start: int, bad: int, full_rows: int) -> torch.Tensor:
        nonlocal layer
        if crop:
            assert start + bad == plan.boundaries[layer], (layer, start, bad)
            y = _cropped_group_norm(gn, x, bad, full_rows, sums[:, layer])
        else:
            if record:
                recorded.append(_group_sums(x, gn.num_groups, plan.boundaries[layer]))
            y = gn(x)
        layer += 1
        return y

    start, bad = 0, 0
    stages = _stages(decoder)
    for s, (upsampler, resnets, last) in enumerate(stages, start=1):
        full_rows = latents.shape[2] * 2 ** s  # the whole map's rows at this stage
        first = plan.starts[s] if crop else 0
        keep = first // 2  # the rows of the previous stage this one reads
        if keep < start + bad:
            raise AssertionError(f"stage {s} reads row {keep}, computed from true values only from {start + bad}")
        assert first == 2 * keep, (s, first)  # the plan's starts are even
        # Upsampling then convolving the rows from ``keep`` on (either form of the
        # upsampler): the first output row reads the zero padding, as in a crop.
        x = upsampler(x[:, :, keep - start:])
        start, reach = first, (1 if first > 0 else 0)
        bad = reach
        for r in resnets:
            h = r.nonlinearity(norm(r.norm1, x, start, bad, full_rows))
            h = r.conv1(h)
            bad += reach
            h = r.nonlinearity(norm(r.norm2, h, start, bad, full_rows))
            h = r.conv2(h)  # dropout: identity at inference
            bad += reach
            shortcut = r.conv_shortcut(x) if r.conv_shortcut is not None else x
            x = (shortcut + h) / r.output_scale_factor
        if last:
            x = decoder.conv_act(norm(decoder.conv_norm_out, x, start, bad, full_rows))
            x = decoder.conv_out(x)
            bad += reach
    if start + bad > plan.visible_row and crop:
        raise AssertionError(f"output rows from {plan.visible_row} wanted, true only from {start + bad}")
    out = x[:, :, (plan.visible_row - start) if crop else plan.visible_row:]
    return out, (torch.stack(recorded, dim=1) if record else None)


def decode_to_unit_rows(vae: nn.Module, latents: torch.Tensor, plan: CropPlan,
                        sums: torch.Tensor | None) -> torch.Tensor:
    """``decode_rows`` as MuseTalk's [0, 1] faces (B, 3, height, width): the rows above
    ``plan.visible_row`` are 0 (the blend never shows them)."""
    rows, _ = decode_rows(vae, latents, plan, sums)
    image = (rows / 2 + 0.5).clamp(0, 1)
    return F.pad(image, (0, 0, plan.visible_row, 0)) if plan.visible_row else image


def first_visible_row(masks: torch.Tensor, geometry: torch.Tensor, face_size: int = 256) -> int:
    """The first row of the ``face_size`` decoded face that the paste can read where the
    blend weight is above zero, over every frame: masks (N, Hb, Wb) uint8 in the box,
    geometry (N, 8) as ``stages.paste`` takes it (box origin, then face box). The paste
    samples bilinearly, so a box row reads the face rows around its source position;
    the upper one is the floor."""
    best = face_size
    for i in range(masks.shape[0]):
        bx1, by1, fx1, fy1, fx2, fy2 = (float(v) for v in geometry[i, [0, 1, 4, 5, 6, 7]])
        m = masks[i]
        cols = torch.arange(m.shape[1], device=m.device, dtype=torch.float32) + (bx1 - fx1)
        rows = torch.arange(m.shape[0], device=m.device, dtype=torch.float32) + (by1 - fy1)
        inside = ((cols >= 0) & (cols < fx2 - fx1))[None, :] & ((rows >= 0) & (rows < fy2 - fy1))[:, None]
        hit = ((m > 0) & inside).any(dim=1).nonzero()
        if hit.numel() == 0:
            continue
        fy = float(rows[int(hit[0])])
        src = (fy + 0.5) * face_size / (fy2 - fy1) - 0.5
        best = min(best, max(0, math.floor(src)))
    return best


def decoder_flops(vae: nn.Module, plan: CropPlan, latent_rows: int = 32, latent_cols: int = 32) -> float:
    """Multiply-adds x2 of the decoder's convolutions (and the mid block's attention
    projections) for one frame under ``plan``: what the crop saves, counted."""
    decoder = vae.decoder
    rows, cols = latent_rows, latent_cols
    total = 0.0

    def conv(m: nn.Conv2d, h: int, w: int) -> float:
        return 2.0 * h * w * m.in_channels * m.out_channels * m.kernel_size[0] * m.kernel_size[1]

    def resnet(r: nn.Module, h: int, w: int) -> float:
        f = conv(r.conv1, h, w) + conv(r.conv2, h, w)
        return f + (conv(r.conv_shortcut, h, w) if r.conv_shortcut is not None else 0.0)

    if vae.post_quant_conv is not None:
        total += conv(vae.post_quant_conv, rows, cols)
    total += conv(decoder.conv_in, rows, cols)
    for r in decoder.mid_block.resnets:
        total += resnet(r, rows, cols)
    for a in decoder.mid_block.attentions:
        if a is not None:
            c, n = a.to_q.in_features, rows * cols
            total += 2.0 * n * c * c * 4 + 2.0 * 2 * n * n * c
    for r in decoder.up_blocks[0].resnets:
        total += resnet(r, rows, cols)
    for s, (upsampler, resnets, last) in enumerate(_stages(decoder), start=1):
        rows, cols = rows * 2, cols * 2
        h = rows - (plan.starts[s] if plan.cropped else 0)
        up = upsampler.flops(h, cols) if isinstance(upsampler, SubpixelUpsample) else conv(upsampler.conv, h, cols)
        total += up + sum(resnet(r, h, cols) for r in resnets)
        if last:
            total += conv(decoder.conv_out, h, cols)
    return total
