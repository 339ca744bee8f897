"""The wheel: every package is in it, it installs into a fresh environment, both commands answer."""

from __future__ import annotations

import subprocess
import sys
import venv
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parent.parent


def test_every_package_on_disk_is_listed_for_the_wheel():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    on_disk = {
        ".".join(p.parent.relative_to(ROOT).parts)
        for top in ("qlora_engine", "app")
        for p in (ROOT / top).rglob("__init__.py")
        if "__pycache__" not in p.parts
    }
    assert on_disk - listed == set(), "add these to [tool.setuptools] packages in pyproject.toml"


def test_wheel_installs_and_both_commands_answer(tmp_path):
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist),
                    str(ROOT)], check=True, capture_output=True)
    wheel = next(dist.glob("qlora_studio-*.whl"))
    # A fresh environment that borrows the heavy dependencies (torch, transformers, Qt) from
    # this one instead of downloading them: what is tested is our wheel, not PyPI.
    env_dir = tmp_path / "env"
    venv.create(env_dir, with_pip=True)
    py = env_dir / "bin" / "python"
    env_site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                              capture_output=True, text=True, check=True).stdout.strip()
    # A plain path line (not a site dir: this checkout's editable-install hook is not run).
    borrowed = [p for p in map(str, sys.path) if p.endswith("site-packages")]
    (Path(env_site) / "borrowed.pth").write_text("\n".join(borrowed) + "\n")
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", str(wheel)], check=True, capture_output=True)
    for command in ("qlora-engine", "qlora-studio"):
        out = subprocess.run([str(env_dir / "bin" / command), "--help"], capture_output=True, text=True, cwd=tmp_path)
        assert out.returncode == 0, out.stderr
        assert "usage" in out.stdout.lower()
    # resources resolve from the installed wheel, not from this checkout
    code = "from qlora_engine import resources; p = resources.path('data', 'quickstart.jsonl'); print(p, p.is_file())"
    out = subprocess.run([str(py), "-c", code], capture_output=True, text=True, cwd=tmp_path, check=True)
    path, exists = out.stdout.split()
    assert exists == "True" and str(env_dir) in path
