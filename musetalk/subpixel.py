"""Nearest 2x upsampling followed by a 3x3 convolution, computed without the upsampling.

Every upsampler of the UNet and of the VAE decoder is ``F.interpolate(x, scale_factor=2,
mode="nearest")`` then a 3x3 convolution with padding 1. An output pixel (2i + a, 2j + b)
of that pair reads upsampled rows 2i + a - 1 .. 2i + a + 1, which are only two distinct
input rows: i - 1 and i for a = 0 (the kernel's rows 1 and 2 read the same row), i and
i + 1 for a = 1 (rows 0 and 1 do). So each of the four phases (a, b) is a 2x2
convolution of the input itself with summed kernel taps, and the four together are one
2x2 convolution with four times the output channels, padded by one:

    out[:, (a, b)] at (i + a, j + b)  ->  y at (2i + a, 2j + b)

That is the same function with 4/9 of the multiply-adds (16 instead of 36 per input pixel
and channel pair) and without the 4x upsampled copy of the input; the results differ only
by rounding (the summed taps are formed in float32, then cast to the model's dtype). The
zero padding is the same too: the rows and columns that read it are the same output
pixels as before, which the cropped decode relies on (``musetalk.cropped_decode``).

The same pair is also a transposed convolution of the input (stride 2, 4x4 kernel,
padding 1): output row 2i + a reads input rows i - 1 and i (a = 0) or i and i + 1
(a = 1), which the stride-2 kernel's rows 3 and 1 (a = 0) or 2 and 0 (a = 1) reach,
holding the same summed taps (``transposed_weights``). That form ("transposed") writes
the interleaved output in the convolution itself; the 2x2 form ("subpixel") needs a
pass that interleaves its four phases. Same multiply-adds, same zero padding.

``use_subpixel_upsampling(module, form)`` swaps every such upsampler of a model for
``SubpixelUpsample``, which keeps the original for any call it does not cover (an
explicit ``output_size`` other than twice the input).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# _TAPS[a][k][r]: how much of the 3x3 kernel's row r the 2x2 kernel's row k of phase a
# holds. Phase 0 reads input rows (i - 1, i): kernel row 0, then rows 1 + 2; phase 1
# reads (i, i + 1): rows 0 + 1, then row 2. The same holds for columns.
_TAPS = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]],
                      [[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]])


def subpixel_weights(weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A 3x3 kernel (Cout, Cin, 3, 3) -> the four phases' 2x2 kernels as one
    (4 * Cout, Cin, 2, 2) kernel, phases in the order (0, 0), (0, 1), (1, 0), (1, 1);
    summed in float32 (or the kernel's wider dtype), returned in the kernel's dtype."""
    if weight.dim() != 4 or tuple(weight.shape[2:]) != (3, 3):
        raise ValueError(f"subpixel upsampling needs a 3x3 kernel, got {tuple(weight.shape)}")
    cout, cin = weight.shape[:2]
    taps = _TAPS.to(weight.device)
    acc = torch.promote_types(weight.dtype, torch.float32)
    w4 = torch.einsum("akr,bls,oirs->aboikl", taps.to(acc), taps.to(acc), weight.to(acc))
    w4 = w4.reshape(4 * cout, cin, 2, 2).to(weight.dtype)
    if weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous():
        w4 = w4.contiguous(memory_format=torch.channels_last)
    b4 = bias.repeat(4) if bias is not None else None
    return w4, b4


# _STRIDED[k][r]: how much of the 3x3 kernel's row r the stride-2 4x4 kernel's row k
# holds (output row 2i + a = 2 * input row - 1 + k): row 3 and row 1 make the even
# output rows (input rows i - 1 and i), rows 2 and 0 the odd ones (rows i and i + 1).
_STRIDED = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 1.0], [1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])

FORMS = ("subpixel", "transposed")


def transposed_weights(weight: torch.Tensor) -> torch.Tensor:
    """A 3x3 kernel (Cout, Cin, 3, 3) -> the (Cin, Cout, 4, 4) kernel of
    ``conv_transpose2d(x, ., stride=2, padding=1)`` computing nearest 2x + that 3x3
    convolution; summed in float32 (or wider), returned in the kernel's dtype."""
    if weight.dim() != 4 or tuple(weight.shape[2:]) != (3, 3):
        raise ValueError(f"transposed upsampling needs a 3x3 kernel, got {tuple(weight.shape)}")
    acc = torch.promote_types(weight.dtype, torch.float32)
    taps = _STRIDED.to(weight.device, acc)
    wt = torch.einsum("kr,ls,oirs->iokl", taps, taps, weight.to(acc)).contiguous().to(weight.dtype)
    if weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous():
        wt = wt.contiguous(memory_format=torch.channels_last)
    return wt


def subpixel_upsample_conv(x: torch.Tensor, weight4: torch.Tensor, bias4: torch.Tensor | None) -> torch.Tensor:
    """``conv3x3(interpolate(x, 2, nearest))`` from ``subpixel_weights``: (B, C, H, W) ->
    (B, Cout, 2H, 2W), in ``x``'s memory format."""
    b, _, h, w = x.shape
    cout = weight4.shape[0] // 4
    out = F.conv2d(x, weight4, bias4, padding=1).view(b, 2, 2, cout, h + 1, w + 1)
    top = torch.stack([out[:, 0, 0, :, :h, :w], out[:, 0, 1, :, :h, 1:]], dim=-1)
    bottom = torch.stack([out[:, 1, 0, :, 1:, :w], out[:, 1, 1, :, 1:, 1:]], dim=-1)
    y = torch.stack([top, bottom], dim=3).reshape(b, cout, 2 * h, 2 * w)
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        y = y.contiguous(memory_format=torch.channels_last)
    return y


def covers(upsampler: nn.Module) -> bool:
    """Whether an upsampler is nearest 2x + a plain 3x3 convolution with padding 1 (what
    ``SubpixelUpsample`` computes); diffusers' ``Upsample2D`` in its usual form."""
    conv = getattr(upsampler, "conv", None)
    return (type(upsampler).__name__ == "Upsample2D" and getattr(upsampler, "use_conv", False)
            and not getattr(upsampler, "use_conv_transpose", True) and getattr(upsampler, "interpolate", False)
            and getattr(upsampler, "norm", None) is None and isinstance(conv, nn.Conv2d)
            and conv.kernel_size == (3, 3) and conv.padding == (1, 1) and conv.stride == (1, 1)
            and conv.dilation == (1, 1) and conv.groups == 1 and conv.padding_mode == "zeros")


class SubpixelUpsample(nn.Module):
    """An ``Upsample2D`` computed without its upsampled copy: as one 2x2 convolution
    and a phase interleave (``form`` "subpixel", ``subpixel_upsample_conv``) or as a
    stride-2 transposed convolution ("transposed"). Calls with another ``output_size``
    than twice the input go to the original module."""

    def __init__(self, original: nn.Module, form: str = "subpixel") -> None:
        super().__init__()
        if not covers(original):
            raise ValueError(f"{type(original).__name__} is not nearest 2x + a 3x3 convolution")
        if form not in FORMS:
            raise ValueError(f"upsampling form {form!r} must be one of {', '.join(FORMS)}")
        self.original = original
        self.form = form
        self.in_channels = original.conv.in_channels
        self.out_channels = original.conv.out_channels
        weight = original.conv.weight.detach()
        bias = None if original.conv.bias is None else original.conv.bias.detach()
        if form == "subpixel":
            w4, b4 = subpixel_weights(weight, bias)
        else:
            w4, b4 = transposed_weights(weight), bias
        self.register_buffer("weight4", w4, persistent=False)
        self.register_buffer("bias4", b4, persistent=False)

    def forward(self, x: torch.Tensor, output_size=None, *args, **kwargs) -> torch.Tensor:
        if output_size is not None and tuple(output_size) != (2 * x.shape[2], 2 * x.shape[3]):
            return self.original(x, output_size, *args, **kwargs)
        if self.form == "transposed":
            return F.conv_transpose2d(x, self.weight4, self.bias4, stride=2, padding=1)
        return subpixel_upsample_conv(x, self.weight4, self.bias4)

    def flops(self, out_rows: int, out_cols: int) -> float:
        """Multiply-adds x2 for an output of ``out_rows`` x ``out_cols``."""
        if self.form == "transposed":  # 4 of the 16 taps reach each output pixel
            return 2.0 * out_rows * out_cols * self.in_channels * self.out_channels * 4
        return 2.0 * (out_rows // 2 + 1) * (out_cols // 2 + 1) * self.in_channels * 4 * self.out_channels * 4


def use_subpixel_upsampling(model: nn.Module, form: str = "subpixel") -> int:
    """Swap every covered upsampler inside ``model`` (in ``upsamplers`` lists, as
    diffusers' blocks hold them) for a ``SubpixelUpsample`` of ``form``; returns how
    many. Apply it after the model has its device, dtype and memory format (the kernels
    are derived once). Idempotent: upsamplers already swapped stay as they are."""
    n = 0
    for module in list(model.modules()):
        ups = getattr(module, "upsamplers", None)
        if not isinstance(ups, nn.ModuleList):
            continue
        for i, up in enumerate(ups):
            if isinstance(up, SubpixelUpsample) or not covers(up):
                continue
            ups[i] = SubpixelUpsample(up, form)
            n += 1
    return n


def bench(shapes: list[tuple[int, int, int, int]], iters: int = 20, device: str = "cuda",
          compiled: bool = True) -> list[dict]:
    """Device ms of each upsampling form at (batch, channels, rows, cols) inputs, in the
    decoder's layout (channels-last, fp16 on CUDA): the upsampler alone, eager, and (with
    ``compiled``) the upsampler followed by GroupNorm + SiLU under torch.compile, as the
    decoder's next layer fuses with it."""
    import time

    dev = torch.device(device)
    dtype = torch.float16 if dev.type == "cuda" else torch.float32
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True

    def timed(fn, x) -> float:
        for _ in range(3):
            fn(x)
        if dev.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(iters):
                fn(x)
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / iters
        t = time.perf_counter()
        for _ in range(iters):
            fn(x)
        return (time.perf_counter() - t) * 1000 / iters

    rows = []
    with torch.inference_mode():
        for b, c, h, w in shapes:
            torch.manual_seed(0)
            conv = nn.Conv2d(c, c, 3, padding=1).to(dev, dtype).to(memory_format=torch.channels_last)
            x = torch.randn(b, c, h, w, device=dev, dtype=dtype).contiguous(memory_format=torch.channels_last)
            w4, b4 = subpixel_weights(conv.weight, conv.bias)
            wt = transposed_weights(conv.weight)
            forms = {
                "nearest": lambda t: conv(F.interpolate(t, scale_factor=2.0, mode="nearest")),
                "subpixel": lambda t: subpixel_upsample_conv(t, w4, b4),
                "transposed": lambda t: F.conv_transpose2d(t, wt, conv.bias, stride=2, padding=1),
            }
            ref = forms["nearest"](x).float()
            row: dict = {"shape": [b, c, h, w]}
            for name, fn in forms.items():
                row[f"{name}_ms"] = round(timed(fn, x), 3)
                row[f"{name}_max_abs"] = round(float((fn(x).float() - ref).abs().max()), 5)
            if compiled:
                groups = 32 if c % 32 == 0 else 1
                gamma, beta = torch.ones(c, device=dev, dtype=dtype), torch.zeros(c, device=dev, dtype=dtype)
                for name in ("subpixel", "transposed"):
                    up = forms[name]
                    fused = torch.compile(lambda t, up=up: F.silu(F.group_norm(up(t), groups, gamma, beta)))
                    row[f"{name}_norm_silu_ms"] = round(timed(fused, x), 3)
            rows.append(row)
    return rows


if __name__ == "__main__":
    import argparse
    import json
    import sys

    p = argparse.ArgumentParser(prog="python -m musetalk.subpixel",
                                description="time the upsampling forms (nearest + conv, subpixel, transposed)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--shapes", default="24x256x84x128,24x512x46x64,24x512x27x32",
                   help="inputs as BxCxHxW, comma-separated (defaults: the inputs of the decoder's three "
                        "upsamplers in a 24-frame step cropped at row 96, last first)")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--no-compile", action="store_true")
    a = p.parse_args()
    shapes = [tuple(int(v) for v in s.split("x")) for s in a.shapes.split(",") if s]
    for r in bench(shapes, a.iters, a.device, not a.no_compile):
        print(json.dumps(r), flush=True)
    sys.exit(0)
