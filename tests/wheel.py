"""Build the project's wheel offline from a copy of the checkout (tests check what it ships)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "README.md", "metering", "pricing", "workers", "data")


def build_wheel(tmp_path: Path) -> Path:
    """Copy the sources (symlinks kept, so the wheel must resolve them) and build a wheel; returns its path."""
    source = tmp_path / "src"
    source.mkdir()
    for item in SOURCES:
        if (ROOT / item).is_dir():
            shutil.copytree(ROOT / item, source / item, symlinks=True)
        elif (ROOT / item).exists():
            shutil.copy2(ROOT / item, source / item)
    dist = tmp_path / "dist"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation", "-q", "-w", str(dist)],
        capture_output=True, text=True,
    )
    assert build.returncode == 0, build.stderr
    (wheel,) = dist.glob("*.whl")
    return wheel
