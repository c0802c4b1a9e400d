"""A cached virtual environment with the real nameko 2.14.1, our interop peer.

nameko is never imported into our own environment: it runs in its own venv, as a
separate process, exactly as a team's existing nameko services would.

    python -m tools.nameko_venv      # create (or reuse) it and print its python
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REQUIREMENTS = [
    "nameko==2.14.1",
    # nameko 2.14.1 predates werkzeug 3 and eventlet's recent API changes.
    "werkzeug<3",
    "eventlet==0.33.3",
    "kombu>=5.3,<5.4",
    "importlib-metadata<5",
    "requests",
]
CACHE_DIR = Path(os.environ.get("NAMEKO_VENV_DIR", ROOT / ".cache" / "nameko-venv"))


def _stamp() -> str:
    return hashlib.sha1("\n".join(REQUIREMENTS).encode()).hexdigest()


def nameko_python() -> Path:
    """The python of the nameko venv, created on first use and reused afterwards."""
    python = CACHE_DIR / "bin" / "python"
    stamp_file = CACHE_DIR / ".requirements-stamp"
    if python.exists() and stamp_file.exists() and stamp_file.read_text() == _stamp():
        return python
    CACHE_DIR.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [sys.executable, "-m", "venv", "--clear", str(CACHE_DIR)], check=True
    )
    subprocess.run(
        [
            str(python),
            "-m",
            "pip",
            "install",
            "-q",
            "--disable-pip-version-check",
            *REQUIREMENTS,
        ],
        check=True,
    )
    stamp_file.write_text(_stamp())
    return python


if __name__ == "__main__":
    print(nameko_python())
