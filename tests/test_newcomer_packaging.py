"""The project builds without a setuptools warning (scripts/setup.sh used to print ~90
lines of them): the licence is an SPDX string, daemon/assets is a package with its data.

Built the way pip builds it (setuptools' PEP 517 hooks, wheel and editable), in a copy
of the project, with every warning an error. setuptools' own note on how editable
installs work ("Editable installation.", InformationOnly) is not about this project's
configuration and is let through."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

BUILD = """
import sys, warnings
from setuptools import build_meta
from setuptools.warnings import InformationOnly

warnings.simplefilter("error")
warnings.filterwarnings("ignore", category=InformationOnly)
print("WHEEL=" + build_meta.build_wheel(sys.argv[1]))
print("EDITABLE=" + build_meta.build_editable(sys.argv[1]))
"""


def test_the_project_builds_with_no_setuptools_warning(tmp_path: Path):
    project = tmp_path / "project"
    project.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, project / name)
    for package in ("daemon", "musetalk", "schemas"):
        shutil.copytree(ROOT / package, project / package, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    dist = tmp_path / "dist"
    dist.mkdir()
    out = subprocess.run([sys.executable, "-c", BUILD, str(dist)], cwd=project, capture_output=True, text=True,
                         timeout=240)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    built = dict(line.split("=", 1) for line in out.stdout.splitlines()
                 if line.startswith(("WHEEL=", "EDITABLE=")))
    assert set(built) == {"WHEEL", "EDITABLE"}, out.stdout[-2000:]
    wheel_name = built["WHEEL"]
    with zipfile.ZipFile(dist / wheel_name) as wheel:
        names = set(wheel.namelist())
        metadata = next(wheel.read(n).decode() for n in names if n.endswith(".dist-info/METADATA"))
    # The demo avatar and speech ship with the package (lipsync demo, asset: URLs).
    assert {"daemon/assets/demo.mp4", "daemon/assets/demo.mp4.landmarks.npy", "daemon/assets/speech.wav"} <= names
    assert "License-Expression: MIT" in metadata.splitlines()
    assert any(line.startswith("Requires-Dist: nvidia-ml-py") for line in metadata.splitlines())
