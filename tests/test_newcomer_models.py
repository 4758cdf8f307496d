"""Without the network, `lipsync models download` says in a few lines which host failed,
what is missing, where it goes and how to run without it; a daemon started without the
weights names model.enabled = false among its ways on."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import free_port


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LIPSYNC_", "HF_"))}
    return {**env, **extra}


def test_download_without_the_hub_is_a_short_message(tmp_path: Path):
    port = free_port()  # nothing listens there: the hub is unreachable, at once, every time
    models = tmp_path / "models"
    out = subprocess.run(
        [sys.executable, "-m", "daemon.cli", "--config", "/dev/null", "models", "download", "--dir", str(models)],
        env=_env(HF_ENDPOINT=f"http://127.0.0.1:{port}", HF_HOME=str(tmp_path / "hf")),
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 1, out.stdout + out.stderr
    err = out.stderr.strip()
    assert "Traceback" not in err and "Traceback" not in out.stdout
    lines = err.splitlines()
    assert 1 <= len(lines) <= 5, err
    assert f"127.0.0.1:{port}" in lines[0]  # which host could not be reached
    assert "Connection refused" in lines[0]
    # Which files are missing, and where they go by hand.
    for path in ("musetalkV15/unet.pth", "sd-vae-ft-mse/diffusion_pytorch_model.safetensors",
                 "whisper-tiny/model.safetensors"):
        assert path in err
    assert str(models) in err and "docs/MODEL.md" in err
    # The ways on without them.
    assert "model.random_weights" in err and "model.enabled = false" in err


def test_download_with_an_unknown_key_says_which_keys_exist(tmp_path: Path):
    out = subprocess.run(
        [sys.executable, "-m", "daemon.cli", "--config", "/dev/null", "models", "download",
         "--dir", str(tmp_path), "--only", "unet,nope"],
        env=_env(), capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 2
    assert "'nope'" in out.stderr and "unet_config" in out.stderr and "Traceback" not in out.stderr


def test_daemon_without_weights_names_model_enabled_false(tmp_path: Path):
    env = _env(
        LIPSYNC_NATS__EMBEDDED_PORT=str(free_port()),
        LIPSYNC_HTTP__PORT="0",
        LIPSYNC_DAEMON__STATE_DIR=str(tmp_path / "state"),
        LIPSYNC_MODEL__DIR=str(tmp_path / "no-models"),
    )
    proc = subprocess.run([sys.executable, "-m", "daemon.main"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 78, proc.stderr[-2000:]
    line = next(json.loads(l) for l in proc.stderr.splitlines() if '"startup failed"' in l)
    assert line["code"] == "models_missing"
    assert "model.enabled = false" in line["error"] and "LIPSYNC_MODEL__ENABLED=false" in line["error"]
