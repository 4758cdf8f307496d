"""How much of a step the UNet of the next step could hide under this step's decode.

At batch 4 to 12 the UNet takes about the same device time (H100: 6.98 ms at 4, 7.37 at
12, 8.95 at 16; docs/BENCHMARKS.md, twentieth session): most of its kernels are too
small to fill the card. The cropped decode's kernels are large. Run on two streams, the
next step's UNet could use the SMs the decode leaves idle, which a step captured as one
CUDA graph on one stream never can. Before the daemon's step is split that way, this
measures what it would gain, per batch size:

- ``unet_ms``, ``decode_ms``: each part alone (its own CUDA graph, replayed back to back);
- ``serial_ms``: a step as today, UNet then decode on one stream, per step;
- ``overlap_ms``: the pipelined form, per step: the UNet of step k+1 on one stream while
  the decode of step k runs on another (each decode waits for its own UNet; a UNet waits
  for the decode two steps back, as two steps in flight would);
- ``saving_ms`` = serial - overlap, and ``saving_pct`` of the serial step.

The parts are the daemon's: the real architectures with full-size random weights (speed
does not depend on weight values), channels-last, the transposed upsampling and the
cropped decode from face row 108, each compiled by Inductor without its own CUDA graphs
and captured in one here. The paste and the copy-out (about 0.5 ms of a 16-frame step)
are left out of both forms.

    python -m musetalk.overlap_bench --batches 12,16 --json overlap.json

On a CPU (``--device cpu --size tiny``, for the tests) the parts run eagerly and the
overlapped figure is the serial one: the figures say nothing about a GPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch


class _Part:
    """One part of a step with static inputs: a captured CUDA graph on a GPU, the
    compiled function itself on a CPU."""

    def __init__(self, fn: Callable[..., torch.Tensor], inputs: tuple[torch.Tensor, ...], cuda: bool) -> None:
        self.fn, self.inputs = fn, inputs
        self.graph: torch.cuda.CUDAGraph | None = None
        if cuda:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # compile and warm up off the capture
                for _ in range(3):
                    fn(*inputs)
            torch.cuda.current_stream().wait_stream(side)
            torch.cuda.synchronize()
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):  # a private memory pool per part
                self.output = fn(*inputs)
        else:
            self.output = fn(*inputs)

    def run(self) -> None:
        if self.graph is not None:
            self.graph.replay()
        else:
            self.output = self.fn(*self.inputs)


def _timed(run: Callable[[], None], steps: int, cuda: bool) -> float:
    """ms per call of ``run`` over ``steps`` calls launched back to back."""
    run()
    if cuda:
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        run()
    if cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / steps * 1000


def measure(batches: list[int], steps: int, device: str = "cuda", size: str = "full",
            crop_row: int = 108) -> dict[str, Any]:
    from musetalk.bench import build_random_models
    from musetalk.engine import AUDIO_DIM, AUDIO_TOKENS, LATENT_SIZE, Engine

    dev = torch.device(device)
    cuda = dev.type == "cuda"
    dtype = torch.float16 if cuda else torch.float32
    models = build_random_models(dev, dtype, size)
    # Not compiled by the engine (that would bring its own CUDA graphs): its functions are
    # compiled here and captured per part.
    engine = Engine(models, compile=False, channels_last=cuda, max_batch=max(batches), decode="cropped",
                    crop_row=crop_row, upsample="transposed")
    plan = engine.crop_plan
    if plan is None:
        raise ValueError("the cropped decode needs a crop row above 0")
    unet_fn = torch.compile(engine._unet_fn, dynamic=False) if cuda else engine._unet_fn
    crop_fn = torch.compile(engine._crop_fn, dynamic=False) if cuda else engine._crop_fn
    rows = []
    with torch.inference_mode():
        for b in batches:
            latents = torch.randn(b, 8, LATENT_SIZE, LATENT_SIZE, device=dev, dtype=dtype)
            tokens = torch.randn(b, AUDIO_TOKENS, AUDIO_DIM, device=dev, dtype=dtype)
            pred = torch.randn(b, 4, LATENT_SIZE, LATENT_SIZE, device=dev, dtype=dtype)
            sums = torch.zeros((b, plan.layers, plan.groups, 2), device=dev)  # values do not change speed
            t0 = time.perf_counter()
            unet = _Part(unet_fn, (latents, tokens), cuda)
            decode = _Part(crop_fn, (pred, sums), cuda)
            compile_s = time.perf_counter() - t0
            unet_ms = _timed(unet.run, steps, cuda)
            decode_ms = _timed(decode.run, steps, cuda)

            def serial() -> None:
                unet.run()
                decode.run()

            serial_ms = _timed(serial, steps, cuda)
            # A CPU has no second stream to overlap on: there both forms are the serial one.
            overlap_ms = _timed_overlap(unet, decode, steps) if cuda else serial_ms
            row = {"batch": b, "unet_ms": round(unet_ms, 3), "decode_ms": round(decode_ms, 3),
                   "serial_ms": round(serial_ms, 3), "overlap_ms": round(overlap_ms, 3),
                   "saving_ms": round(serial_ms - overlap_ms, 3),
                   "saving_pct": round(100 * (serial_ms - overlap_ms) / serial_ms, 1),
                   "serial_ms_per_frame": round(serial_ms / b, 4), "overlap_ms_per_frame": round(overlap_ms / b, 4),
                   "compile_s": round(compile_s, 1)}
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    return {"rows": rows, "crop_row": crop_row, "steps": steps,
            "device": torch.cuda.get_device_name(dev) if cuda else "cpu", "torch": torch.__version__}


def _timed_overlap(unet: _Part, decode: _Part, steps: int) -> float:
    """ms per step of the pipelined form: UNets on one stream, decodes on another, each
    decode after its UNet, each UNet after the decode two steps back."""
    ustream, dstream = torch.cuda.Stream(), torch.cuda.Stream()
    torch.cuda.synchronize()
    unet_done: list[torch.cuda.Event] = []
    decode_done: list[torch.cuda.Event] = []
    t = time.perf_counter()
    for k in range(steps):
        with torch.cuda.stream(ustream):
            if k >= 2:
                ustream.wait_event(decode_done[k - 2])
            unet.run()
            unet_done.append(torch.cuda.Event())
            unet_done[-1].record(ustream)
        with torch.cuda.stream(dstream):
            dstream.wait_event(unet_done[k])
            decode.run()
            decode_done.append(torch.cuda.Event())
            decode_done[-1].record(dstream)
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / steps * 1000


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m musetalk.overlap_bench", description=__doc__.splitlines()[0])
    p.add_argument("--batches", default="12,16")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--device", default="cuda")
    p.add_argument("--size", default="full", choices=("full", "tiny"))
    p.add_argument("--crop-row", type=int, default=108)
    p.add_argument("--json", type=Path)
    a = p.parse_args(argv)
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        print("overlap_bench: no CUDA device here; its figures mean something only on a GPU "
              "(--device cpu --size tiny runs the parts eagerly, for the tests)", file=sys.stderr)
        return 2
    batches = [int(x) for x in a.batches.split(",") if x]
    result = measure(batches, a.steps, a.device, a.size, a.crop_row)
    for row in result["rows"]:
        print(f"B={row['batch']:>3} unet {row['unet_ms']:7.2f} decode {row['decode_ms']:7.2f} "
              f"serial {row['serial_ms']:7.2f} overlapped {row['overlap_ms']:7.2f} ms/step: "
              f"{row['saving_ms']:+.2f} ms ({row['saving_pct']:+.1f} %)", flush=True)
    if a.json:
        a.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
