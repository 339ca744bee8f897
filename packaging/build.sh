#!/usr/bin/env bash
# Build the frozen one-folder QLoRA Studio from a clean virtual environment, smoke-test it and
# pack it as a tarball (Linux; macOS should work as is, untested; Windows: see packaging/README.md).
#
#   packaging/build.sh
#
# Makes, under dist/ of the checkout:
#   qlora_studio-<version>-py3-none-any.whl        the wheel (python -m build), which the frozen app is built from
#   qlora-studio/                                  the frozen app: run qlora-studio/qlora-studio
#   qlora-studio-<version>-linux-<arch>.tar.gz     that folder packed, with the desktop files and install-desktop.sh
# and build/frozen/result.txt: size, start-up time and the smoke test's verdict.
#
# Settings (environment):
#   PYTHON       interpreter for the build venv (default python3; needs its shared libpython)
#   TORCH_SPEC   the torch to install first (default torch==2.13.0: the CPU build where pip's index
#                offers it, as on our build machines). For a CUDA build of the app install a CUDA torch:
#                TORCH_SPEC="torch==2.13.0" PIP_INDEX_URL=<the PyTorch CUDA wheel index>. The spec ships
#                the bitsandbytes libraries that match whichever torch is installed.
#   BUILD_DIR    venv, PyInstaller's work folder and the smoke test's files (default build/frozen)
#   DIST_DIR     outputs (default dist)
#   KEEP_VENV=1  reuse BUILD_DIR/venv if it exists (a quicker rebuild; not a clean build)
#   SKIP_FREEZE=1  keep DIST_DIR/qlora-studio as it is and only smoke-test and pack it again
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
BUILD_DIR="$(mkdir -p "${BUILD_DIR:-$ROOT/build/frozen}" && cd "${BUILD_DIR:-$ROOT/build/frozen}" && pwd)"
DIST_DIR="$(mkdir -p "${DIST_DIR:-$ROOT/dist}" && cd "${DIST_DIR:-$ROOT/dist}" && pwd)"
VENV="$BUILD_DIR/venv"
VPY="$VENV/bin/python"
APP_DIR="$DIST_DIR/qlora-studio"
APP="$APP_DIR/qlora-studio"
RESULT="$BUILD_DIR/result.txt"

say() { printf '\n== %s\n' "$*"; }
now() { "$VPY" -c 'import time; print(f"{time.time():.3f}")'; }

# -- 1. a clean virtual environment --------------------------------------------------------------
if [[ "${KEEP_VENV:-}" == 1 && -x "$VPY" ]]; then
    say "reusing $VENV (KEEP_VENV=1)"
else
    say "creating a clean virtual environment in $VENV with $("$PYTHON" -V 2>&1)"
    "$PYTHON" -m venv --clear "$VENV"
    "$VPY" -m pip install -q --upgrade pip
fi
say "installing $TORCH_SPEC, then build and PyInstaller"
"$VPY" -m pip install -q "$TORCH_SPEC"
"$VPY" -m pip install -q build pyinstaller

# -- 2. the wheel, installed as a user installs it -----------------------------------------------
say "building the wheel (python -m build)"
VERSION="$("$VPY" -c 'import tomllib, sys; print(tomllib.load(open(sys.argv[1], "rb"))["project"]["version"])' "$ROOT/pyproject.toml")"
rm -f "$DIST_DIR"/qlora_studio-"$VERSION"-*.whl
"$VPY" -m build --wheel --outdir "$DIST_DIR" "$ROOT" > "$BUILD_DIR/wheel.log" 2>&1 || { tail -30 "$BUILD_DIR/wheel.log"; exit 1; }
WHEEL="$(ls "$DIST_DIR"/qlora_studio-"$VERSION"-*.whl)"
"$VPY" -m pip install -q --force-reinstall --no-deps "$WHEEL"
"$VPY" -m pip install -q "$WHEEL"   # its dependencies (torch is already there, so pip keeps that build)
"$VPY" -m pip check || true
"$VPY" -c 'import torch, bitsandbytes; print("torch", torch.__version__, "cuda", torch.version.cuda, "| bitsandbytes", bitsandbytes.__version__)' 2>/dev/null

# -- 3. the frozen app ------------------------------------------------------------------------------
rm -f "$DIST_DIR"/qlora-studio-"$VERSION"-*.tar.gz
if [[ "${SKIP_FREEZE:-}" == 1 && -x "$APP" ]]; then
    say "keeping the frozen app in $APP_DIR (SKIP_FREEZE=1)"
else
    say "PyInstaller (several minutes)"
    rm -rf "$APP_DIR"
    # run outside the checkout, so the analysis finds the installed wheel and not the source folders
    ( cd "$BUILD_DIR" && "$VENV/bin/pyinstaller" --noconfirm --clean --log-level WARN \
        --distpath "$DIST_DIR" --workpath "$BUILD_DIR/work" "$ROOT/packaging/qlora-studio.spec" ) \
        > "$BUILD_DIR/pyinstaller.log" 2>&1 || { tail -40 "$BUILD_DIR/pyinstaller.log"; exit 1; }
fi

# the desktop integration travels with the folder (install-desktop.sh points Exec at this copy)
cp "$ROOT/packaging/qlora-studio.desktop" "$ROOT/packaging/install-desktop.sh" "$APP_DIR/"
mkdir -p "$APP_DIR/icons" && cp -R "$ROOT/packaging/icons/hicolor" "$APP_DIR/icons/"

# -- 4. smoke test ----------------------------------------------------------------------------------
say "smoke test (offscreen)"
SMOKE="$BUILD_DIR/smoke"
rm -rf "$SMOKE" && mkdir -p "$SMOKE"
# a tiny random Llama (safetensors + tokenizer), built with the tests' own builder: no download
"$VPY" -c 'import sys; sys.path.insert(0, sys.argv[1]); from tiny import build_tiny_llama; build_tiny_llama(sys.argv[2])' \
    "$ROOT/tests" "$SMOKE/tiny-llama" > /dev/null 2>&1
export QT_QPA_PLATFORM=offscreen HF_HUB_OFFLINE=1

"$APP" --engine --help > "$SMOKE/engine-help.txt"
grep -q "usage" "$SMOKE/engine-help.txt"
echo "engine --help: ok"

# start-up, measured from outside: exec, the main window shown (and styled), closed, exited
for run in first second; do
    t0="$(now)"
    QLORA_STUDIO_HOME="$SMOKE/home-$run" "$APP" --smoke-test --only window > "$SMOKE/startup-$run.txt" 2>&1
    t1="$(now)"
    grep -q '^OK$' "$SMOKE/startup-$run.txt"
    declare "STARTUP_${run}=$("$VPY" -c "print(f'{$t1 - $t0:.1f}')")"
done
echo "start-up (exec to window shown, closed and exited): ${STARTUP_first}s and ${STARTUP_second}s"

set +e
QLORA_STUDIO_HOME="$SMOKE/home" "$APP" --smoke-test --train "$SMOKE/tiny-llama" --screenshot "$SMOKE/window.png" > "$SMOKE/smoke.txt" 2>&1
SMOKE_RC=$?
set -e
grep -E '^(ok|FAIL|OK|FAILED)' "$SMOKE/smoke.txt" || true

# the same window on a real X server (the xcb platform plugin a Linux desktop uses), where there is one to start
X11="not run (no xvfb-run here)"
if command -v xvfb-run > /dev/null; then
    set +e
    QT_QPA_PLATFORM=xcb QLORA_STUDIO_HOME="$SMOKE/home-x11" xvfb-run -a -s "-screen 0 1600x1000x24" \
        "$APP" --smoke-test --only resources,qt,window --screenshot "$SMOKE/window-x11.png" > "$SMOKE/x11.txt" 2>&1
    X11_RC=$?
    set -e
    X11="$(grep -E '^ok +(qt|window)' "$SMOKE/x11.txt" | sed 's/^ok *//' | tr '\n' ';' | sed 's/;$//'); $(tail -1 "$SMOKE/x11.txt")"
    echo "under Xvfb: $X11"
    [[ $X11_RC -eq 0 ]] || SMOKE_RC=$X11_RC
fi
# libraries the X11 plugin needs that the build machine lacks are not bundled: the user's system must have them
UNBUNDLED="$(grep -o "could not resolve '[^']*', dependency of '[^']*plugins/platforms/[^']*'" "$BUILD_DIR/pyinstaller.log" | cut -d"'" -f2 | sort -u | tr '\n' ' ' || true)"
[[ -z "$UNBUNDLED" ]] || echo "note: not bundled (missing on this build machine): $UNBUNDLED"

# -- 5. the tarball ---------------------------------------------------------------------------------
ARCH="$(uname -m)"
OS="$(uname -s | tr '[:upper:]' '[:lower:]')"
TARBALL="$DIST_DIR/qlora-studio-$VERSION-$OS-$ARCH.tar.gz"
if [[ $SMOKE_RC -eq 0 ]]; then
    say "packing $TARBALL"
    tar -C "$DIST_DIR" -czf "$TARBALL" qlora-studio
fi

{
    echo "built: $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(uname -srm), $("$VPY" -V)"
    "$VPY" -c 'import torch, bitsandbytes, PySide6, PyInstaller; print(f"torch {torch.__version__} (cuda {torch.version.cuda}), bitsandbytes {bitsandbytes.__version__}, PySide6 {PySide6.__version__}, PyInstaller {PyInstaller.__version__}")' 2>/dev/null
    echo "wheel: $(basename "$WHEEL") $(du -h "$WHEEL" | cut -f1)"
    echo "frozen folder: $(du -sh "$APP_DIR" | cut -f1) in $(find "$APP_DIR" -type f | wc -l) files"
    [[ -f "$TARBALL" && $SMOKE_RC -eq 0 ]] && echo "tarball: $(basename "$TARBALL") $(du -h "$TARBALL" | cut -f1)"
    echo "start-up (exec to window shown, closed and exited), two runs: ${STARTUP_first}s, ${STARTUP_second}s"
    echo "X11 (Xvfb): $X11"
    [[ -z "$UNBUNDLED" ]] || echo "X11 plugin libraries not bundled (missing on the build machine): $UNBUNDLED"
    echo "smoke test:"
    grep -E '^(ok|FAIL|OK|FAILED)' "$SMOKE/smoke.txt" | sed 's/^/  /' || echo "  (no result: see $SMOKE/smoke.txt)"
} > "$RESULT"
say "result ($RESULT)"
cat "$RESULT"
exit $SMOKE_RC
