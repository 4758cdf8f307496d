"""The compiled step's kernel variants, measured against each other on one device.

Each variant runs in its own process (a fresh compiler state and Inductor config): the
real architectures with full-size random weights (speed does not depend on weight
values), ``Engine(compile=True)`` as the daemon builds it, the cropped decode, a
synthetic 300-pixel blend box. Per batch size: ms per step when steps are launched back
to back (the device's throughput: the host runs ahead), ms per frame, the device ms of
each stage (CUDA events of sampled steps), the host ms of one ``launch`` and the compile
time (first launches, including CUDA-graph recording).

    python -m musetalk.step_bench --variants baseline,fused,freezing --batches 12,24 --json steps.json

``--profile N`` adds, per batch, a kernel profile of N more steps (torch.profiler): the
device ms a step spends in each kind of kernel (``kernel_category``: convolutions,
matrix products, attention, Inductor's fused pointwise and reduction kernels such as
GroupNorm and SiLU, copies) and the costliest kernels, which says what a faster kernel
would have to replace.

Variants: ``baseline`` (what the daemon runs: ``mode="reduce-overhead"``, the UNet and the
decode as two graphs), ``fused`` (``model.fuse_step``: one graph for both), ``freezing``
(Inductor ``freezing``: weights folded as constants), ``autotune`` (Inductor
``max_autotune``: Triton templates benchmarked against cuDNN/cuBLAS, and the fused
kernels' block sizes), its two halves ``autotune_mm`` (``max_autotune_gemm``: the
templates for convolutions and matrix products only) and ``autotune_pw``
(``max_autotune_pointwise``: block sizes of Inductor's pointwise and reduction kernels
only, the GroupNorm and SiLU passes), ``cdt`` (``coordinate_descent_tuning``: those
kernels' block sizes searched further, one at a time), ``subpixel``
(``model.upsample = "subpixel"``: the upsamplers as 2x2 convolutions), ``transposed``
(``model.upsample = "transposed"``: as stride-2 transposed convolutions), ``crop104`` and
``crop108`` (the cropped decode from face row 104 or 108 instead of 96, as
``model.decode_crop_row_high`` runs it for the avatars it covers), and ``+``
combinations such as ``fused+freezing`` or ``transposed+crop108``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

VARIANTS: dict[str, dict[str, Any]] = {
    "baseline": {},
    "fused": {"fuse_step": True},
    "freezing": {"inductor": {"freezing": True}},
    "autotune": {"inductor": {"max_autotune": True}},
    "autotune_mm": {"inductor": {"max_autotune_gemm": True}},
    "autotune_pw": {"inductor": {"max_autotune_pointwise": True}},
    "cdt": {"inductor": {"coordinate_descent_tuning": True}},
    "subpixel": {"upsample": "subpixel"},
    "transposed": {"upsample": "transposed"},
    "crop104": {"crop_row": 104},
    "crop108": {"crop_row": 108},
}


def variant_options(name: str) -> dict[str, Any]:
    """Engine keyword arguments of a variant name (``+`` joins variants)."""
    opts: dict[str, Any] = {"fuse_step": False, "inductor": {}, "upsample": "nearest", "crop_row": 96}
    for part in name.split("+"):
        if part not in VARIANTS:
            raise ValueError(f"unknown variant {part!r}: choose from {', '.join(VARIANTS)} (joined with +)")
        extra = VARIANTS[part]
        opts["fuse_step"] = opts["fuse_step"] or extra.get("fuse_step", False)
        opts["inductor"] = {**opts["inductor"], **extra.get("inductor", {})}
        opts["upsample"] = extra.get("upsample", opts["upsample"])
        opts["crop_row"] = extra.get("crop_row", opts["crop_row"])
    return opts


# Kernel names (CUDA) or operator names (CPU) -> the kind of work, first match wins.
# Inductor's own kernels come first: their names list the operators they fused, so a
# pointwise kernel beside a convolution is called "triton_poi_fused_..._convolution_...".
_CATEGORIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("reduction", ("triton_red", "triton_per")),
    ("pointwise", ("triton_poi",)),
    ("attention", ("flash", "fmha", "attention", "sdpa")),
    ("conv", ("conv", "fprop", "implicit_gemm", "winograd")),
    ("gemm", ("gemm", "nvjet", "cutlass", "cublas", "aten::mm", "addmm", "bmm", "matmul", "linear")),
    ("reduction", ("triton_red", "triton_per", "reduce", "norm", "aten::sum", "aten::mean", "aten::var")),
    ("pointwise", ("triton_poi", "elementwise", "vectorized", "aten::add", "aten::mul", "silu", "gelu",
                   "aten::sub", "aten::div", "clamp", "aten::cat", "aten::stack", "upsample", "index")),
    ("copy", ("memcpy", "memset", "copy", "aten::to", "aten::contiguous")),
)


def kernel_category(name: str) -> str:
    """The kind of work a kernel (or a CPU operator) does, from its name."""
    low = name.lower()
    for category, needles in _CATEGORIES:
        if any(n in low for n in needles):
            return category
    return "other"


def profile_steps(launch: Any, steps: int, cuda: bool, top: int = 12, per_kind: int = 5) -> dict[str, Any]:
    """Device ms per step by kernel category, the ``top`` costliest kernels, and the
    ``per_kind`` costliest of each category (the norms' and pointwise passes hide below
    the convolutions in the overall list), over ``steps`` calls of ``launch`` (each
    returns a step handle) under torch.profiler."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            launch().boxes()
        if cuda:
            torch.cuda.synchronize()
    by_kind: dict[str, float] = {}
    kernels: list[tuple[float, str, int]] = []
    for ev in prof.key_averages():
        if cuda:
            us = getattr(ev, "self_device_time_total", None)
            if us is None:
                us = ev.self_cuda_time_total
            if ev.device_type != torch.autograd.DeviceType.CUDA:
                continue
        else:
            us = ev.self_cpu_time_total
            if not ev.key.startswith("aten::"):
                continue
        if us <= 0:
            continue
        ms = us / 1000 / steps
        kind = kernel_category(ev.key)
        by_kind[kind] = by_kind.get(kind, 0.0) + ms
        kernels.append((ms, ev.key, ev.count // steps))
    kernels.sort(reverse=True)

    def item(ms: float, name: str, calls: int) -> dict[str, Any]:
        return {"ms": round(ms, 3), "calls": calls, "kind": kernel_category(name), "name": name[:160]}

    top_by_kind: dict[str, list[dict[str, Any]]] = {}
    for ms, name, calls in kernels:
        same = top_by_kind.setdefault(kernel_category(name), [])
        if len(same) < per_kind:
            same.append(item(ms, name, calls))
    return {"steps": steps, "total_ms": round(sum(by_kind.values()), 3),
            "by_kind_ms": {k: round(v, 3) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
            "top": [item(ms, name, calls) for ms, name, calls in kernels[:top]],
            "top_by_kind": top_by_kind}


def run_variant(name: str, batches: list[int], steps: int, device: str = "cuda", size: str = "full",
                decode: str = "cropped", profile: int = 0) -> dict[str, Any]:
    import torch

    from musetalk.bench import build_random_models
    from musetalk.engine import AUDIO_DIM, AUDIO_TOKENS, Engine, _synthetic_avatar

    dev = torch.device(device)
    opts = variant_options(name)
    models = build_random_models(dev, torch.float16 if dev.type == "cuda" else torch.float32, size)
    engine = Engine(models, compile=True, max_batch=max(batches), decode=decode,
                    fuse_step=opts["fuse_step"], inductor=opts["inductor"] or None,
                    upsample=opts["upsample"], crop_row=opts["crop_row"])
    avatar = _synthetic_avatar("bench", 300, 512)
    engine.register_avatar(avatar)
    if engine.crop_plan is not None:  # the sums' values do not change the speed
        plan = engine.crop_plan
        engine._avatars["bench"].gn_sums = torch.zeros((avatar.num_frames, plan.layers, plan.groups, 2),
                                                       device=dev)
    rows = []
    with torch.inference_mode():
        for b in batches:
            args = (["bench"] * b, [i % 2 for i in range(b)],
                    torch.randn(b, AUDIO_TOKENS, AUDIO_DIM, device=dev, dtype=torch.float16), [1.0] * b)
            t0 = time.perf_counter()
            for _ in range(3):  # compile, record, replay
                engine.launch(*args).boxes()
            compile_s = time.perf_counter() - t0
            for _ in range(5):
                engine.launch(*args).boxes()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            host_ms, handles = [], []
            t0 = time.perf_counter()
            for i in range(steps):
                t = time.perf_counter()
                handles.append(engine.launch(*args, timed=i % 4 == 0))
                host_ms.append((time.perf_counter() - t) * 1000)
            handles[-1].boxes()
            step_ms = (time.perf_counter() - t0) / steps * 1000
            stages: dict[str, list[float]] = {}
            for h in handles:
                for k, v in (h.stage_ms() or {}).items():
                    stages.setdefault(k, []).append(v)
            row = {"batch": b, "step_ms": round(step_ms, 3), "ms_per_frame": round(step_ms / b, 4),
                   "frames_per_s": round(b * 1000 / step_ms, 1), "compile_s": round(compile_s, 1),
                   "host_launch_ms": round(statistics.median(host_ms), 3),
                   **{f"{k}_ms": round(statistics.median(v), 3) for k, v in stages.items()}}
            if profile:
                row["kernels"] = profile_steps(lambda: engine.launch(*args), profile, dev.type == "cuda")
            rows.append(row)
            print(json.dumps({"variant": name, **row}), file=sys.stderr, flush=True)
    return {"variant": name, "options": opts, "rows": rows,
            "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
            "torch": torch.__version__}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m musetalk.step_bench", description=__doc__.splitlines()[0])
    p.add_argument("--variants", default="baseline,fused,freezing")
    p.add_argument("--batches", default="12,24")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--device", default="cuda")
    p.add_argument("--size", default="full", choices=("full", "tiny"))
    p.add_argument("--decode", default="cropped", choices=("cropped", "full"))
    p.add_argument("--timeout-s", type=float, default=600, help="per variant (compile included)")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="also profile N steps per batch: device ms by kernel kind, the costliest kernels")
    p.add_argument("--json", type=Path)
    p.add_argument("--one", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    batches = [int(x) for x in a.batches.split(",") if x]
    if a.one:
        print(json.dumps(run_variant(a.one, batches, a.steps, a.device, a.size, a.decode, a.profile)))
        return 0
    names = [v for v in a.variants.split(",") if v]
    for name in names:
        variant_options(name)  # an unknown name fails before anything runs
    results = []
    for name in names:
        cmd = [sys.executable, "-m", "musetalk.step_bench", "--one", name, "--batches", a.batches,
               "--steps", str(a.steps), "--device", a.device, "--size", a.size, "--decode", a.decode,
               "--profile", str(a.profile)]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout_s)
            lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
            if done.returncode != 0 or not lines:
                tail = done.stderr.strip().splitlines()[-3:]
                results.append({"variant": name, "error": f"exit {done.returncode}: {' | '.join(tail)}"[:800]})
            else:
                results.append(json.loads(lines[-1]))
        except subprocess.TimeoutExpired:
            results.append({"variant": name, "error": f"over {a.timeout_s:.0f} s (compile included)"})
        r = results[-1]
        for row in r.get("rows", []):
            print(f"{name:>16} B={row['batch']:>3} {row['step_ms']:8.2f} ms/step {row['ms_per_frame']:7.3f} ms/frame "
                  f"unet {row.get('unet_ms', 0):7.2f} decode {row.get('vae_decode_ms', 0):7.2f} "
                  f"paste {row.get('paste_ms', 0):6.2f} host {row['host_launch_ms']:6.2f} "
                  f"compile {row['compile_s']:6.1f} s", flush=True)
            if "kernels" in row:
                k = row["kernels"]
                kinds = ", ".join(f"{kind} {ms:.2f}" for kind, ms in k["by_kind_ms"].items())
                print(f"{'':>16} kernels {k['total_ms']:.2f} ms/step: {kinds}", flush=True)
                shown = k["top"][:6]
                for kind in ("pointwise", "reduction"):  # below the convolutions, yet a third of a step
                    shown += [t for t in k.get("top_by_kind", {}).get(kind, [])[:3] if t not in shown]
                for item in shown:
                    print(f"{'':>20} {item['ms']:7.3f} ms x{item['calls']:<3} {item['kind']:<9} {item['name'][:90]}",
                          flush=True)
        if "error" in r:
            print(f"{name:>16} failed: {r['error']}", flush=True)
        if a.json:  # after each variant: a run cut short keeps the variants it finished
            a.json.write_text(json.dumps(results, indent=1))
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
