"""PyInstaller hook for bitsandbytes (overrides the generic one in pyinstaller-hooks-contrib).

bitsandbytes finds its native library at import time by path, not by the loader's search:
``bitsandbytes/consts.py`` sets ``PACKAGE_DIR = Path(__file__).parent`` and
``bitsandbytes/cextension.py`` loads ``PACKAGE_DIR / "libbitsandbytes_<backend><suffix>"``.
In a frozen app ``__file__`` of its modules is ``<bundle>/bitsandbytes/<module>.pyc``, so the
libraries go to ``<bundle>/bitsandbytes/`` itself, where that path finds them. (PyInstaller's
ctypes shim would also retry a failed load by file name in the bundle's top folder, but
nowhere else, and a library that is not collected at all is found by nothing.) With no
library, a CUDA machine fails at the first 4-bit layer, and a CPU is worse off: bitsandbytes
logs nothing and falls back to slower pure-PyTorch kernels. ``frozen_smoke.py`` checks that
the native library was loaded and lies inside the bundle; removing it from a built folder
makes that check fail.

Which libraries: the generic hook ships all of them (about 170 MB: every CUDA, ROCm and XPU
build). bitsandbytes only ever loads the CPU one, or one whose backend and major version match
the torch it runs with, so we ship those for the torch installed here (the CPU build: just
``libbitsandbytes_cpu``). ``QLORA_BNB_LIBS=all`` at build time ships every one.
"""

from __future__ import annotations

import os
import re

from PyInstaller.utils.hooks import collect_dynamic_libs, get_module_attribute, logger

_SUFFIXES = (".so", ".dll", ".dylib")


def _wanted(name: str, cuda: str | None, hip: str | None, xpu: bool) -> bool:
    stem = name.rsplit(".", 1)[0]
    if stem.endswith("_cpu") or stem.endswith("_mps"):
        return True
    m = re.match(r"libbitsandbytes_(cuda|rocm|xpu)(\d+)", stem)
    if m is None:
        return False
    backend, digits = m.groups()
    if backend == "cuda" and cuda:
        return digits.startswith(cuda.split(".")[0])  # same major: what bitsandbytes' loader accepts
    if backend == "rocm" and hip:
        return digits.startswith(hip.split(".")[0])
    return backend == "xpu" and xpu


def _torch_build() -> tuple[str | None, str | None, bool]:
    cuda = get_module_attribute("torch.version", "cuda")
    hip = get_module_attribute("torch.version", "hip")
    try:
        xpu = bool(get_module_attribute("torch.version", "xpu"))
    except AttributeError:
        xpu = False
    return cuda, hip, xpu


_all = [(src, dest) for src, dest in collect_dynamic_libs("bitsandbytes") if src.endswith(_SUFFIXES)]
if os.environ.get("QLORA_BNB_LIBS") == "all":
    binaries = _all
else:
    _cuda, _hip, _xpu = _torch_build()
    binaries = [(src, dest) for src, dest in _all if _wanted(os.path.basename(src), _cuda, _hip, _xpu)]
if not binaries:
    raise SystemExit("hook-bitsandbytes: no native library of bitsandbytes matches this torch build")
# dest is "bitsandbytes" for each: next to the modules, where bitsandbytes looks
logger.info("hook-bitsandbytes: shipping %s", ", ".join(os.path.basename(s) for s, _ in binaries))

# The Triton kernels that bitsandbytes can use are compiled from their Python source at run time.
module_collection_mode = "pyz+py"
