"""Model file table, status check, download verification and random weights.

The hub cannot be reached from tests: ``download`` is driven through its ``fetch``
parameter by a fetch that copies from a local folder (standing in for the hub) and
reports the size and sha256 that the hub would report.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from musetalk.weights import (
    MANIFEST_NAME,
    MODEL_FILES,
    Fetched,
    ModelFileError,
    check,
    download,
    model_path,
    write_random_weights,
)

torch.set_num_threads(1)


def test_table_mirrors_the_hub_layout():
    paths = {f.key: f.local_path for f in MODEL_FILES}
    assert paths["unet"] == "musetalkV15/unet.pth"
    assert paths["unet_config"] == "musetalkV15/musetalk.json"
    assert paths["vae"] == "sd-vae-ft-mse/diffusion_pytorch_model.safetensors"
    assert paths["dwpose"] == "dwpose/dw-ll_ucoco_384.onnx"
    assert paths["face_parse"] == "face-parse-bisent/79999_iter.pth"
    required = {f.key for f in MODEL_FILES if f.required}
    assert {"unet", "unet_config", "vae", "vae_config", "whisper"} <= required
    assert not any(f.required for f in MODEL_FILES if f.key.startswith("face_parse"))
    assert all("research" in f.licence for f in MODEL_FILES if f.key.startswith("face_parse"))


def test_check_reports_missing_files_with_the_fix(tmp_path):
    statuses = check(tmp_path)
    assert len(statuses) == len(MODEL_FILES)
    assert all(s.state == "missing" for s in statuses)
    unet = next(s for s in statuses if s.file.key == "unet")
    assert unet.path == tmp_path / "musetalkV15" / "unet.pth"
    assert unet.fix == f"lipsync models download --dir {tmp_path} --only unet"
    assert "required" in unet.detail


def test_check_finds_bad_files(tmp_path):
    cfg = model_path(tmp_path, "unet_config")
    cfg.parent.mkdir(parents=True)
    cfg.write_text("{not json")
    vae = model_path(tmp_path, "vae")
    vae.parent.mkdir(parents=True)
    vae.write_bytes(b"")
    pth = model_path(tmp_path, "unet")
    pth.write_bytes(b"<html>rate limited</html>")
    by_key = {s.file.key: s for s in check(tmp_path)}
    assert by_key["unet_config"].state == "bad" and "JSON" in by_key["unet_config"].detail
    assert by_key["vae"].state == "bad" and "empty" in by_key["vae"].detail
    assert by_key["unet"].state == "bad" and "torch checkpoint" in by_key["unet"].detail


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return write_random_weights(tmp_path_factory.mktemp("tiny"), size="tiny")


def test_random_weights_pass_the_check_and_load(tiny_dir):
    from musetalk.models import load_models

    by_key = {s.file.key: s for s in check(tiny_dir)}
    for key in ("unet_config", "unet", "vae_config", "vae"):
        assert by_key[key].state == "present", by_key[key]
    cfg = json.loads(model_path(tiny_dir, "unet_config").read_text())
    assert (cfg["in_channels"], cfg["out_channels"], cfg["cross_attention_dim"]) == (8, 4, 384)
    vae_cfg = json.loads(model_path(tiny_dir, "vae_config").read_text())
    assert len(vae_cfg["block_out_channels"]) == 4  # VAE factor 8
    models = load_models(tiny_dir, "cpu")
    assert models.unet.config.in_channels == 8


class LocalHub:
    """Stands in for the hub: serves files from a folder, reports size and sha256."""

    def __init__(self, root: Path, lie_about: dict[str, dict] | None = None) -> None:
        self.root = root
        self.calls: list[str] = []
        self.lie_about = lie_about or {}

    def __call__(self, file, model_dir: Path, progress: bool) -> Fetched:
        self.calls.append(file.key)
        src = self.root / file.local_path
        staging = model_dir / ".staging" / file.local_path
        staging.parent.mkdir(parents=True, exist_ok=True)
        data = src.read_bytes()
        staging.write_bytes(data)
        claims = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        claims.update(self.lie_about.get(file.key, {}))
        return Fetched(staging, claims["size"], claims["sha256"])


def test_download_verifies_and_records(tiny_dir, tmp_path):
    hub = LocalHub(tiny_dir)
    keys = ["unet_config", "unet", "vae_config", "vae"]
    statuses = download(tmp_path, only=keys, progress=False, fetch=hub)
    assert hub.calls == keys
    by_key = {s.file.key: s for s in statuses}
    for key in keys:
        assert by_key[key].state == "present" and by_key[key].detail == "verified at download"
        assert model_path(tmp_path, key).read_bytes() == model_path(tiny_dir, key).read_bytes()
    manifest = json.loads((tmp_path / MANIFEST_NAME).read_text())
    unet_bytes = model_path(tiny_dir, "unet").read_bytes()
    assert manifest["musetalkV15/unet.pth"]["sha256"] == hashlib.sha256(unet_bytes).hexdigest()

    # A second run skips what is already verified.
    download(tmp_path, only=keys, progress=False, fetch=hub)
    assert hub.calls == keys

    # A file truncated afterwards is reported, with the command that fixes it.
    path = model_path(tmp_path, "unet")
    path.write_bytes(path.read_bytes()[:1000])
    unet = next(s for s in check(tmp_path) if s.file.key == "unet")
    assert unet.state == "bad" and "verified download" in unet.detail
    assert "lipsync models download" in unet.fix


def test_download_refuses_a_wrong_checksum(tiny_dir, tmp_path):
    hub = LocalHub(tiny_dir, lie_about={"unet": {"sha256": "0" * 64}})
    with pytest.raises(ModelFileError, match=r"unet\.pth: sha256 .* does not match"):
        download(tmp_path, only=["unet"], progress=False, fetch=hub)
    assert not (tmp_path / MANIFEST_NAME).exists() or "musetalkV15/unet.pth" not in json.loads(
        (tmp_path / MANIFEST_NAME).read_text()
    )


def test_download_refuses_an_incomplete_file(tiny_dir, tmp_path):
    hub = LocalHub(tiny_dir, lie_about={"vae": {"size": 10**9, "sha256": None}})
    with pytest.raises(ModelFileError, match="incomplete"):
        download(tmp_path, only=["vae"], progress=False, fetch=hub)


def test_unknown_key_is_named(tmp_path):
    with pytest.raises(KeyError, match="nope"):
        download(tmp_path / "models", only=["nope"], fetch=lambda *a: None)
    assert not (tmp_path / "models").exists()
