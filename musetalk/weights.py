"""Model files: where they come from, where they go, whether they are intact.

The models directory mirrors the hub layout::

    musetalkV15/musetalk.json, musetalkV15/unet.pth          TMElyralab/MuseTalk
    sd-vae-ft-mse/config.json, diffusion_pytorch_model.safetensors
    whisper-tiny/config.json, preprocessor_config.json, model.safetensors
    dwpose/dw-ll_ucoco_384.onnx                               (optional)
    face-parse-bisent/79999_iter.pth, resnet18-5c106cde.pth   (optional, research-only)

``download`` fetches with huggingface_hub (resumable, progress bars) and verifies
each file on completion against the hub's size and, for LFS files, sha256; a manifest
of what was verified lets ``check`` spot a file truncated or replaced later.
``write_random_weights`` writes every file in its real format with random values, for
tests and benchmarks (speed does not depend on weight values).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

MANIFEST_NAME = ".lipsync-manifest.json"
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")

GENERATOR_LICENCE = (
    "MuseTalk: code MIT; the trained models 'available for any purpose, even commercially' "
    "(TMElyralab/MuseTalk README)"
)
VAE_LICENCE = "sd-vae-ft-mse: MIT (stabilityai)"
WHISPER_LICENCE = "whisper-tiny: Apache-2.0 (OpenAI)"
DWPOSE_LICENCE = "DWPose: Apache-2.0 code; COCO-WholeBody training data (check your use)"
BISENET_LICENCE = (
    "BiSeNet face parsing: trained on CelebAMask-HQ, research/non-commercial data only; "
    "optional, the project falls back to its own geometric masks"
)


class ModelFileError(RuntimeError):
    """A model file is missing or unusable; the message names it and the fix."""

    def __init__(self, path: Path, problem: str, model_dir: Path | None = None) -> None:
        fix = fix_command(model_dir if model_dir is not None else Path(path).parent)
        super().__init__(f"{path}: {problem}. Fetch the models with `{fix}`")
        self.path = Path(path)


class FetchFailed(RuntimeError):
    """A source could not deliver a file: ``url`` is what was asked, ``reason`` the
    network's or the hub's answer in a few words."""

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(f"{url}: {reason}")
        self.url = url
        self.reason = reason


class DownloadError(RuntimeError):
    """A download stopped before every file was in place. The message is for a person at
    a terminal: which host failed, which files are still missing, and the ways on without
    the network (copying the files by hand, random weights, no model)."""


@dataclass(frozen=True)
class ModelFile:
    key: str
    repo_id: str
    filename: str  # path inside the hub repository
    local_path: str  # path inside the models directory
    required: bool
    licence: str
    # Fetched by a plain ``download`` (False: only when named in ``only``).
    default: bool = True


MODEL_FILES: tuple[ModelFile, ...] = (
    ModelFile("unet_config", "TMElyralab/MuseTalk", "musetalkV15/musetalk.json",
              "musetalkV15/musetalk.json", True, GENERATOR_LICENCE),
    ModelFile("unet", "TMElyralab/MuseTalk", "musetalkV15/unet.pth",
              "musetalkV15/unet.pth", True, GENERATOR_LICENCE),
    ModelFile("vae_config", "stabilityai/sd-vae-ft-mse", "config.json",
              "sd-vae-ft-mse/config.json", True, VAE_LICENCE),
    ModelFile("vae", "stabilityai/sd-vae-ft-mse", "diffusion_pytorch_model.safetensors",
              "sd-vae-ft-mse/diffusion_pytorch_model.safetensors", True, VAE_LICENCE),
    ModelFile("whisper_config", "openai/whisper-tiny", "config.json",
              "whisper-tiny/config.json", True, WHISPER_LICENCE),
    ModelFile("whisper_preprocessor", "openai/whisper-tiny", "preprocessor_config.json",
              "whisper-tiny/preprocessor_config.json", True, WHISPER_LICENCE),
    ModelFile("whisper", "openai/whisper-tiny", "model.safetensors",
              "whisper-tiny/model.safetensors", True, WHISPER_LICENCE),
    ModelFile("dwpose", "yzd-v/DWPose", "dw-ll_ucoco_384.onnx",
              "dwpose/dw-ll_ucoco_384.onnx", False, DWPOSE_LICENCE),
    ModelFile("face_parse", "ManyOtherFunctions/face-parse-bisent", "79999_iter.pth",
              "face-parse-bisent/79999_iter.pth", False, BISENET_LICENCE),
    ModelFile("face_parse_backbone", "ManyOtherFunctions/face-parse-bisent",
              "resnet18-5c106cde.pth", "face-parse-bisent/resnet18-5c106cde.pth", False,
              BISENET_LICENCE + "; the ImageNet backbone the reference initialises from, "
              "not read by this project (79999_iter.pth holds all weights)", default=False),
)
_BY_KEY = {f.key: f for f in MODEL_FILES}


def fix_command(model_dir: Path, keys: Iterable[str] | None = None) -> str:
    cmd = f"lipsync models download --dir {model_dir}"
    if keys:
        cmd += " --only " + ",".join(keys)
    return cmd


def model_file(key: str) -> ModelFile:
    try:
        return _BY_KEY[key]
    except KeyError:
        raise KeyError(f"unknown model file {key!r}; known: {', '.join(_BY_KEY)}") from None


def model_path(model_dir: Path, key: str) -> Path:
    return Path(model_dir) / model_file(key).local_path


def locate(model_dir: str | Path, key: str) -> Path | None:
    """Where a model file is: at its place in the models dir layout, or directly in
    ``model_dir`` (a folder holding just that file); None when it is in neither."""
    placed = model_path(Path(model_dir), key)
    for candidate in (placed, Path(model_dir) / placed.name):
        if candidate.is_file():
            return candidate
    return None


# ---------------------------------------------------------------------------- check


@dataclass(frozen=True)
class FileStatus:
    file: ModelFile
    path: Path
    state: str  # "present" | "missing" | "bad"
    detail: str
    fix: str

    @property
    def ok(self) -> bool:
        return self.state == "present"


def _read_manifest(model_dir: Path) -> dict:
    try:
        return json.loads((Path(model_dir) / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return {}


def _write_manifest(model_dir: Path, manifest: dict) -> None:
    path = Path(model_dir) / MANIFEST_NAME
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    os.replace(tmp, path)


def format_problem(path: Path) -> str | None:
    """A cheap structural check by file type; None when the file looks usable."""
    size = path.stat().st_size
    if size == 0:
        return "file is empty"
    with path.open("rb") as fh:
        head = fh.read(16)
    suffix = path.suffix
    if suffix == ".json":
        try:
            json.loads(path.read_text())
        except ValueError as exc:
            return f"not valid JSON ({exc})"
    elif suffix == ".safetensors":
        if size < 8:
            return "truncated safetensors file"
        header_len = int.from_bytes(head[:8], "little")
        if header_len <= 0 or 8 + header_len > size:
            return "truncated or corrupt safetensors header"
    elif suffix == ".pth":
        # torch.save writes a zip archive; older checkpoints are a raw pickle.
        if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):
            return "not a torch checkpoint (neither zip nor pickle)"
    elif suffix == ".onnx" and size < 16:
        return "truncated ONNX file"
    return None


def check(model_dir: Path) -> list[FileStatus]:
    """Status of every file of MODEL_FILES under ``model_dir`` (no network)."""
    model_dir = Path(model_dir)
    manifest = _read_manifest(model_dir)
    out: list[FileStatus] = []
    for f in MODEL_FILES:
        path = model_dir / f.local_path
        fix = fix_command(model_dir, [f.key])
        if not path.is_file():
            need = "required" if f.required else "optional"
            out.append(FileStatus(f, path, "missing", f"missing ({need})", fix))
            continue
        problem = format_problem(path)
        recorded = manifest.get(f.local_path)
        if problem is None and recorded and recorded.get("size") != path.stat().st_size:
            problem = (
                f"size {path.stat().st_size} differs from the verified download "
                f"({recorded.get('size')} bytes)"
            )
        if problem is not None:
            out.append(FileStatus(f, path, "bad", problem, fix))
        else:
            how = "verified at download" if recorded else "present (not verified against the hub)"
            out.append(FileStatus(f, path, "present", how, ""))
    return out


def require(model_dir: Path, keys: Iterable[str]) -> dict[str, Path]:
    """Paths of ``keys``; raises ModelFileError naming the first missing or bad file."""
    statuses = {s.file.key: s for s in check(model_dir)}
    paths = {}
    for key in keys:
        st = statuses[key]
        if st.state == "missing":
            raise ModelFileError(st.path, "missing", model_dir)
        if st.state == "bad":
            raise ModelFileError(st.path, st.detail, model_dir)
        paths[key] = st.path
    return paths


# ---------------------------------------------------------------------------- download


@dataclass(frozen=True)
class Fetched:
    """What a fetch produced: a local file and what the source says it should be."""

    path: Path
    expected_size: int | None
    expected_sha256: str | None


# A fetch puts ``file`` into ``dest`` (the models directory) and reports what it got.
Fetch = Callable[[ModelFile, Path, bool], Fetched]


def hub_fetch(file: ModelFile, model_dir: Path, progress: bool) -> Fetched:
    """Fetch one file from the Hugging Face hub into the models directory (resumable).

    Network and hub failures come out as FetchFailed (the URL and the reason), not as the
    HTTP stack's own traceback."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url
    from huggingface_hub.errors import HTTPError  # the HTTP library's base error, whichever it is
    from tqdm.auto import tqdm

    url = hf_hub_url(file.repo_id, file.filename)
    # local_dir keeps the repo-relative name; the repo's own folder prefix is added
    # where the hub repo is not itself the folder (TMElyralab/MuseTalk holds musetalkV15/).
    target_root = model_dir / file.local_path.removesuffix(file.filename).rstrip("/")
    kwargs = {"tqdm_class": tqdm} if progress else {}
    if not progress:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    try:
        meta = get_hf_file_metadata(url)
        got = hf_hub_download(file.repo_id, file.filename, local_dir=target_root, **kwargs)
    except (OSError, HTTPError) as exc:
        raise FetchFailed(url, _short_reason(exc)) from exc
    # For LFS files the etag is the sha256 of the content; for small git files it is a
    # git blob hash, which says nothing about sha256.
    etag = (meta.etag or "").strip('"').removeprefix("W/").strip('"')
    sha = etag if _SHA256_RE.match(etag) else None
    return Fetched(Path(got), meta.size, sha)


def _short_reason(exc: BaseException) -> str:
    """The first line of an exception's text (hub errors carry paragraphs), or its type."""
    text = str(exc).strip().splitlines()
    reason = text[0].strip() if text else ""
    return reason[:200] or type(exc).__name__


def download_failure(model_dir: Path, wanted: Iterable[ModelFile], failed: FetchFailed) -> str:
    """What to tell a person whose download stopped at ``failed``: a few short lines."""
    from urllib.parse import urlsplit

    host = urlsplit(failed.url).netloc or failed.url
    statuses = {st.file.key: st for st in check(model_dir)}
    missing = [f for f in wanted if not statuses[f.key].ok]
    required = [f.local_path for f in missing if f.required]
    optional = [f.local_path for f in missing if not f.required]
    lines = [f"cannot download the model files from {host}: {failed.reason} (fetching {failed.url})"]
    if required or optional:
        listed = ", ".join(required) + (" (required)" if required else "")
        if optional:
            listed += ("; " if required else "") + ", ".join(optional) + " (optional)"
        lines.append(f"missing in {model_dir}: {listed}")
        lines.append(f"by hand: copy each file to that path under {model_dir} (sources: the table in "
                     f"docs/MODEL.md, section Weights), then run `lipsync models check --dir {model_dir}`")
    lines.append("without them: model.random_weights = true (LIPSYNC_MODEL__RANDOM_WEIGHTS=1: all real but "
                 "the mouth, which is noise) or model.enabled = false (LIPSYNC_MODEL__ENABLED=false: the "
                 "speech over the idle video, no model)")
    return "\n".join(lines)


def sha256_of(path: Path, chunk: int = 8 << 20) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def verify(fetched: Fetched, file: ModelFile) -> dict:
    """Check a fetched file against its expected size/sha256; raises ModelFileError."""
    path = fetched.path
    if not path.is_file():
        raise ModelFileError(path, "the download produced no file")
    size = path.stat().st_size
    if fetched.expected_size is not None and size != fetched.expected_size:
        raise ModelFileError(
            path, f"downloaded {size} bytes, the hub says {fetched.expected_size} (incomplete)"
        )
    digest = None
    if fetched.expected_sha256 is not None:
        digest = sha256_of(path)
        if digest != fetched.expected_sha256:
            raise ModelFileError(
                path, f"sha256 {digest} does not match the hub's {fetched.expected_sha256}"
            )
    problem = format_problem(path)
    if problem:
        raise ModelFileError(path, problem)
    return {"size": size, "sha256": digest, "repo": file.repo_id, "filename": file.filename}


def download(
    model_dir: Path,
    only: Iterable[str] | None = None,
    progress: bool = True,
    *,
    include_optional: bool = True,
    fetch: Fetch | None = None,
) -> list[FileStatus]:
    """Fetch the model files (all, or the keys in ``only``), verify them, return ``check``.

    Files already verified (manifest size matches) are skipped. ``fetch`` defaults to
    the hub; a test or a mirror can pass its own. A fetch that fails (FetchFailed) stops
    the download with DownloadError, which says what is missing and how to go on.
    """
    wanted = [model_file(k) for k in only] if only else [
        f for f in MODEL_FILES if f.required or (include_optional and f.default)
    ]
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    fetch = fetch or hub_fetch
    manifest = _read_manifest(model_dir)
    for f in wanted:
        dest = model_dir / f.local_path
        rec = manifest.get(f.local_path)
        if rec and dest.is_file() and dest.stat().st_size == rec.get("size"):
            log.info("model file %s already verified", dest)
            continue
        try:
            fetched = fetch(f, model_dir, progress)
        except FetchFailed as exc:
            raise DownloadError(download_failure(model_dir, wanted, exc)) from None
        if fetched.path.resolve() != dest.resolve():
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(fetched.path), dest)
            fetched = Fetched(dest, fetched.expected_size, fetched.expected_sha256)
        manifest[f.local_path] = verify(fetched, f)
        _write_manifest(model_dir, manifest)
    return check(model_dir)


# ---------------------------------------------------------------------------- random weights


def write_random_weights(model_dir: Path, size: str = "tiny", seed: int = 0) -> Path:
    """Write every model file in its real format with random values.

    ``size="tiny"``: narrow networks of the same topology (CPU tests).
    ``size="full"``: the real configurations (about 3.4 GB for unet.pth; benchmarks).
    Files owned by other modules (whisper, landmarks, face parsing) are written by
    those modules' own writers when they are installed.
    """
    import torch

    from musetalk.unet import MUSETALK_UNET_CONFIG, TINY_UNET_CONFIG, build_unet
    from musetalk.vae import SD_VAE_FT_MSE_CONFIG, TINY_VAE_CONFIG, build_vae

    if size not in ("tiny", "full"):
        raise ValueError(f"size must be 'tiny' or 'full', not {size!r}")
    model_dir = Path(model_dir)
    torch.manual_seed(seed)

    unet_cfg = TINY_UNET_CONFIG if size == "tiny" else MUSETALK_UNET_CONFIG
    unet_dir = model_dir / "musetalkV15"
    unet_dir.mkdir(parents=True, exist_ok=True)
    (unet_dir / "musetalk.json").write_text(json.dumps(unet_cfg, indent=2))
    torch.save(build_unet(unet_cfg).state_dict(), unet_dir / "unet.pth")

    vae_cfg = TINY_VAE_CONFIG if size == "tiny" else SD_VAE_FT_MSE_CONFIG
    vae = build_vae(vae_cfg)
    vae_dir = model_dir / "sd-vae-ft-mse"
    with tempfile.TemporaryDirectory(dir=model_dir) as tmp:
        vae.save_pretrained(tmp, safe_serialization=True)
        vae_dir.mkdir(parents=True, exist_ok=True)
        for name in ("config.json", "diffusion_pytorch_model.safetensors"):
            os.replace(Path(tmp) / name, vae_dir / name)

    _write_other_modules(model_dir, size)
    return model_dir


def _write_other_modules(model_dir: Path, size: str) -> None:
    """Whisper, landmark and face-parsing files come from their own modules' writers."""
    import importlib

    def writer(module: str, name: str):
        try:
            return getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as exc:
            log.warning("not writing %s files: %s.%s unavailable (%s)", module, module, name, exc)
            return None

    if (fn := writer("musetalk.whisper", "write_random_whisper")) is not None:
        fn(model_dir / "whisper-tiny", size)
    if (fn := writer("musetalk.landmarks", "write_tiny_dwpose_onnx")) is not None:
        path = model_path(model_dir, "dwpose")
        path.parent.mkdir(parents=True, exist_ok=True)
        fn(path)
    if (fn := writer("musetalk.face_parsing", "write_random_bisenet")) is not None:
        path = model_path(model_dir, "face_parse")
        path.parent.mkdir(parents=True, exist_ok=True)
        fn(path)
