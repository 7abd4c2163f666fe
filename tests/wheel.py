"""Building our wheel in a test: from a copy of the sources (a build writes build/ and *.egg-info
into its source folder), offline, with the build backend this environment already has."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def build_wheel(src: Path, dist: Path) -> Path:
    """`pip wheel` of the project in `src` into `dist`: the wheel's path."""
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
         "--disable-pip-version-check", "-w", str(dist), str(src)],
        check=False, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (whl,) = dist.glob("quantserve-*.whl")
    return whl
