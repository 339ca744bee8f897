"""The packaging files that CI can check without building the frozen app (packaging/build.sh does that).

The desktop entry is valid and names a program and an icon we ship; the icons exist at each
size as real PNGs of that size (and the Windows/macOS icon files hold them); the PyInstaller
spec parses and every file it names exists; the frozen executable's dispatch to the engine
matches the command the window builds; install-desktop.sh installs and uninstalls.
"""

from __future__ import annotations

import ast
import configparser
import importlib.util
import os
import shutil
import struct
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parent.parent
PACKAGING = ROOT / "packaging"
SPEC = PACKAGING / "qlora-studio.spec"
DESKTOP = PACKAGING / "qlora-studio.desktop"
ICONS = PACKAGING / "icons"
SVG = ROOT / "qlora_engine" / "resources" / "icons" / "qlora-studio.svg"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _load(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


render_icons = _load(PACKAGING / "render_icons.py")  # SIZES and the ICO/ICNS layout; Qt is imported only to render


def png_size(data: bytes) -> tuple[int, int, int]:
    """(width, height, color type) from a PNG's IHDR chunk; fails on anything that is not a PNG."""
    assert data[:8] == PNG_SIGNATURE, "not a PNG"
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    width, height, _depth, color_type = struct.unpack(">IIBB", data[16:26])
    return width, height, color_type


def gui_script_name() -> str:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["gui-scripts"]
    (name,) = [k for k, v in scripts.items() if v == "app.main:main"]
    return name


# -- the desktop entry ----------------------------------------------------------------------------

# The keys of the Desktop Entry Specification (1.4 and 1.5) that an application entry may carry.
DESKTOP_KEYS = {
    "Type", "Version", "Name", "GenericName", "NoDisplay", "Comment", "Icon", "Hidden", "OnlyShowIn", "NotShowIn",
    "DBusActivatable", "TryExec", "Exec", "Path", "Terminal", "Actions", "MimeType", "Categories", "Implements",
    "Keywords", "StartupNotify", "StartupWMClass", "PrefersNonDefaultGPU", "SingleMainWindow",
}  # fmt: skip
MAIN_CATEGORIES = {
    "AudioVideo", "Audio", "Video", "Development", "Education", "Game", "Graphics", "Network", "Office", "Science",
    "Settings", "System", "Utility",
}  # fmt: skip


def read_desktop() -> dict[str, str]:
    parser = configparser.ConfigParser(interpolation=None, strict=True)  # strict: a repeated key fails
    parser.optionxform = str  # keys are case-sensitive
    parser.read_string(DESKTOP.read_text(encoding="utf-8"))
    assert parser.sections() == ["Desktop Entry"]
    return dict(parser["Desktop Entry"])


def test_desktop_entry_is_valid():
    entry = read_desktop()
    assert set(entry) <= DESKTOP_KEYS, f"unknown keys {set(entry) - DESKTOP_KEYS}"
    assert entry["Type"] == "Application"
    assert entry["Version"] == "1.4"  # 1.5 is newer than the validators of current LTS distributions
    assert entry["Name"] == "QLoRA Studio"
    for key in ("Terminal", "StartupNotify"):
        assert entry[key] in ("true", "false")
    assert entry["Terminal"] == "false"  # a GUI program
    for key in ("Categories", "Keywords"):
        assert entry[key].endswith(";"), f"{key} is a list and ends with ';'"
    categories = set(entry["Categories"].rstrip(";").split(";"))
    assert categories & MAIN_CATEGORIES, "at least one main category, or menus file it under 'Other'"
    # Exec: the program, then only field codes a file-opening app may take
    program, *args = entry["Exec"].split()
    assert program == gui_script_name() == entry["TryExec"]
    assert args in ([], ["%f"], ["%F"]), args
    assert entry["StartupWMClass"] == program  # app/main.py names the application "qlora-studio"


def test_desktop_entry_passes_desktop_file_validate():
    validate = shutil.which("desktop-file-validate")
    if validate is None:
        pytest.skip("desktop-file-validate (desktop-file-utils) is not installed")
    out = subprocess.run([validate, str(DESKTOP)], capture_output=True, text=True)
    assert out.returncode == 0 and not out.stdout.strip(), out.stdout + out.stderr


def test_desktop_icon_name_resolves_to_shipped_files():
    name = read_desktop()["Icon"]
    assert "/" not in name and not name.endswith((".png", ".svg")), "a theme icon name, not a path"
    for size in render_icons.SIZES:
        assert render_icons.png_path(size).name == f"{name}.png"
        assert render_icons.png_path(size).is_file()
    assert (ICONS / "hicolor" / "scalable" / "apps" / f"{name}.svg").is_file()


# -- icons ----------------------------------------------------------------------------------------


def test_every_usual_size_is_a_real_png_of_that_size():
    assert {16, 22, 24, 32, 48, 64, 128, 256, 512} <= set(render_icons.SIZES)
    for size in render_icons.SIZES:
        path = render_icons.png_path(size)
        assert path.parent == ICONS / "hicolor" / f"{size}x{size}" / "apps"
        width, height, color_type = png_size(path.read_bytes())
        assert (width, height) == (size, size), path
        assert color_type == 6, f"{path}: RGBA, so the rounded corners are transparent"
    # nothing else in the hicolor tree: a stray size would be installed too
    sizes_on_disk = {p.name for p in (ICONS / "hicolor").iterdir()}
    assert sizes_on_disk == {f"{s}x{s}" for s in render_icons.SIZES} | {"scalable"}


def test_svg_source_is_square_and_its_scalable_copy_is_current():
    root = ET.fromstring(SVG.read_bytes())
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    _x, _y, w, h = map(float, root.get("viewBox").split())
    assert w == h
    assert (ICONS / "hicolor" / "scalable" / "apps" / "qlora-studio.svg").read_bytes() == SVG.read_bytes(), (
        "run python packaging/render_icons.py after editing the SVG"
    )


def test_windows_ico_holds_png_images_of_the_sizes_it_lists():
    data = (ICONS / "qlora-studio.ico").read_bytes()
    reserved, kind, count = struct.unpack("<HHH", data[:6])
    assert (reserved, kind) == (0, 1) and count == len(render_icons.ICO_SIZES)
    seen = []
    for i in range(count):
        w, h, _c, _r, _planes, _bpp, length, offset = struct.unpack("<BBBBHHII", data[6 + 16 * i : 22 + 16 * i])
        width, height, _ = png_size(data[offset : offset + length])
        assert (width, height) == (w or 256, h or 256)
        seen.append(width)
    assert sorted(seen) == sorted(render_icons.ICO_SIZES)
    assert 256 in seen  # Explorer's largest view


def test_macos_icns_holds_png_images_of_the_sizes_its_types_mean():
    data = (ICONS / "qlora-studio.icns").read_bytes()
    assert data[:4] == b"icns" and struct.unpack(">I", data[4:8])[0] == len(data)
    pos, found = 8, {}
    while pos < len(data):
        kind, length = struct.unpack(">4sI", data[pos : pos + 8])
        found[kind] = png_size(data[pos + 8 : pos + length])[:2]
        pos += length
    assert pos == len(data)
    assert found == {k: (s, s) for k, s in render_icons.ICNS_TYPES.items()}


# -- the PyInstaller spec ---------------------------------------------------------------------------


def spec_tree() -> ast.Module:
    return ast.parse(SPEC.read_text(encoding="utf-8"), filename=str(SPEC))


def _here_path(node: ast.AST) -> Path | None:
    """``HERE / "a" / "b"`` -> packaging/a/b; None for any other expression."""
    parts = []
    while isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div) and isinstance(node.right, ast.Constant):
        parts.append(node.right.value)
        node = node.left
    if isinstance(node, ast.Name) and node.id == "HERE" and parts:
        return PACKAGING.joinpath(*reversed(parts))
    return None


def test_spec_parses_and_every_path_it_names_exists():
    tree = spec_tree()
    compile(tree, str(SPEC), "exec")
    paths = {p for node in ast.walk(tree) if (p := _here_path(node)) is not None}
    assert paths, "the spec names its files as HERE / ..."
    missing = [str(p.relative_to(ROOT)) for p in paths if not p.exists()]
    assert not missing, missing
    names = {p.relative_to(PACKAGING).as_posix() for p in paths}
    assert {"frozen_main.py", "frozen_smoke.py", "hooks", "icons/qlora-studio.ico", "icons/qlora-studio.icns"} <= names


def _assigned(tree: ast.Module, name: str):
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
            return node.value
    raise AssertionError(f"the spec assigns no {name}")


def _call(tree: ast.Module, func: str) -> ast.Call:
    calls = [
        n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == func
    ]
    assert len(calls) == 1, f"one {func}(...) call"
    return calls[0]


def test_spec_builds_a_windowed_one_folder_app_named_like_the_gui_command():
    tree = spec_tree()
    assert ast.literal_eval(_assigned(tree, "NAME")) == gui_script_name()
    exe = {k.arg: k.value for k in _call(tree, "EXE").keywords}
    assert ast.literal_eval(exe["console"]) is False, "a GUI app: no console window"
    assert ast.literal_eval(exe["exclude_binaries"]) is True, "one folder, not one file"
    _call(tree, "COLLECT")
    analysis = {k.arg: k.value for k in _call(tree, "Analysis").keywords}
    assert ast.unparse(analysis["hookspath"]) == "[str(HOOKS)]"


def test_spec_hooks_exist_and_compile():
    hooks = sorted((PACKAGING / "hooks").glob("hook-*.py"))
    assert [h.name for h in hooks] == ["hook-bitsandbytes.py"]
    for path in [*hooks, PACKAGING / "frozen_main.py", PACKAGING / "frozen_smoke.py", PACKAGING / "render_icons.py"]:
        compile(path.read_text(encoding="utf-8"), str(path), "exec")


def test_bitsandbytes_hook_ships_the_libraries_that_match_the_torch_build():
    source = (PACKAGING / "hooks" / "hook-bitsandbytes.py").read_text(encoding="utf-8")
    namespace: dict = {}
    tree = ast.parse(source)
    # only the pure helper, not the module body (which needs PyInstaller's build context)
    (func,) = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "_wanted"]
    module = ast.fix_missing_locations(ast.Module(body=[ast.Import(names=[ast.alias("re")]), func], type_ignores=[]))
    exec(compile(module, "hook-bitsandbytes.py", "exec"), namespace)
    wanted = namespace["_wanted"]
    libs = ["libbitsandbytes_cpu.so", "libbitsandbytes_cuda118.so", "libbitsandbytes_cuda124.so",
            "libbitsandbytes_cuda128.so", "libbitsandbytes_cuda130.so", "libbitsandbytes_rocm64.so",
            "libbitsandbytes_xpu2025.so", "libbitsandbytes_cpu.dll", "libbitsandbytes_cuda126.dll"]  # fmt: skip
    pick = lambda cuda, hip, xpu: [lib for lib in libs if wanted(lib, cuda, hip, xpu)]  # noqa: E731
    assert pick(None, None, False) == ["libbitsandbytes_cpu.so", "libbitsandbytes_cpu.dll"]  # a CPU torch
    assert pick("12.8", None, False) == [
        "libbitsandbytes_cpu.so", "libbitsandbytes_cuda124.so", "libbitsandbytes_cuda128.so",
        "libbitsandbytes_cpu.dll", "libbitsandbytes_cuda126.dll",
    ]  # fmt: skip
    assert pick("13.0", None, False) == [
        "libbitsandbytes_cpu.so",
        "libbitsandbytes_cuda130.so",
        "libbitsandbytes_cpu.dll",
    ]
    assert "libbitsandbytes_rocm64.so" in pick(None, "6.4", False)
    assert "libbitsandbytes_xpu2025.so" in pick(None, None, True)


def _qt_modules_imported(top: Path) -> set[str]:
    found = set()
    for path in top.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            found |= {n.split(".")[1] for n in names if n.startswith("PySide6.")}
    return found


def test_the_qt_modules_the_spec_leaves_out_are_not_used_by_the_app():
    unused = set(ast.literal_eval(_assigned(spec_tree(), "UNUSED_QT")))
    used = _qt_modules_imported(ROOT / "app") | _qt_modules_imported(ROOT / "qlora_engine")
    assert {"QtCore", "QtGui", "QtWidgets"} <= used
    assert not used & unused, f"the app imports {used & unused}, which the spec leaves out"
    # pyqtgraph draws the charts and imports these at start-up
    assert not {"QtOpenGL", "QtOpenGLWidgets", "QtSvg", "QtTest"} & unused


# -- the frozen executable's parts ------------------------------------------------------------------


def test_frozen_command_of_the_window_reaches_the_engine(capsys):
    """engine_argv turns ``[python, -m, qlora_engine, ...]`` into ``[exe, --engine, ...]`` when frozen."""
    from app.main import main as app_main
    from app.run_worker import engine_command

    cmd = engine_command(Path("run.yaml"))
    assert cmd[:3] == [sys.executable, "-m", "qlora_engine"], "engine_argv strips exactly these three"
    assert cmd[3] == "train"
    with pytest.raises(SystemExit) as exit_info:
        app_main(["--engine", "--help"])
    assert exit_info.value.code == 0
    assert "usage: qlora-engine" in capsys.readouterr().out


def test_frozen_entry_runs_the_smoke_test_checks_that_need_no_model():
    env = {**os.environ, "QT_QPA_PLATFORM": "offscreen"}
    out = subprocess.run(
        [sys.executable, str(PACKAGING / "frozen_main.py"), "--smoke-test", "--only", "resources,qt"],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    assert lines[-1] == "OK"
    assert [ln.split(":")[0] for ln in lines if ln.startswith("ok")] == ["ok     resources", "ok     qt"]


# -- the scripts ----------------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_build_script_parses_and_uses_the_spec():
    subprocess.run(["bash", "-n", str(PACKAGING / "build.sh")], check=True)
    text = (PACKAGING / "build.sh").read_text()
    assert "packaging/qlora-studio.spec" in text and "--smoke-test" in text
    assert os.access(PACKAGING / "build.sh", os.X_OK) and os.access(PACKAGING / "install-desktop.sh", os.X_OK)


@pytest.mark.skipif(shutil.which("sh") is None, reason="needs a POSIX shell")
def test_install_desktop_installs_for_the_current_user_and_uninstalls(tmp_path):
    # the unpacked tarball's layout, in a folder whose name has a space
    folder = tmp_path / "my apps" / "qlora-studio"
    folder.mkdir(parents=True)
    for name in ("qlora-studio.desktop", "install-desktop.sh"):
        shutil.copy2(PACKAGING / name, folder / name)
    shutil.copytree(ICONS / "hicolor", folder / "icons" / "hicolor")
    program = folder / "qlora-studio"
    program.write_text("#!/bin/sh\nexit 0\n")
    program.chmod(0o755)
    data = tmp_path / "data"
    env = {**os.environ, "XDG_DATA_HOME": str(data), "HOME": str(tmp_path)}

    subprocess.run(["sh", str(folder / "install-desktop.sh")], check=True, env=env, capture_output=True)
    installed = data / "applications" / "qlora-studio.desktop"
    lines = installed.read_text().splitlines()
    assert f'Exec="{program}" %f' in lines  # quoted: the path has a space
    assert f"TryExec={program}" in lines
    assert [ln for ln in lines if not ln.startswith(("Exec=", "TryExec="))] == [
        ln for ln in DESKTOP.read_text().splitlines() if not ln.startswith(("Exec=", "TryExec="))
    ]
    for size in render_icons.SIZES:
        target = data / "icons" / "hicolor" / f"{size}x{size}" / "apps" / "qlora-studio.png"
        assert target.read_bytes() == render_icons.png_path(size).read_bytes()
    assert (data / "icons" / "hicolor" / "scalable" / "apps" / "qlora-studio.svg").is_file()
    assert not (data / "icons" / "hicolor" / "icon-theme.cache").exists()
    if validate := shutil.which("desktop-file-validate"):
        out = subprocess.run([validate, str(installed)], capture_output=True, text=True)
        assert out.returncode == 0 and not out.stdout.strip(), out.stdout

    subprocess.run(["sh", str(folder / "install-desktop.sh"), "--uninstall"], check=True, env=env, capture_output=True)
    assert not installed.exists()
    assert not list((data / "icons").rglob("qlora-studio.*"))

    # nothing to launch: a clear error, nothing written
    (folder / "qlora-studio").unlink()
    out = subprocess.run(["sh", str(folder / "install-desktop.sh")], env={**env, "PATH": "/usr/bin:/bin"},
                         capture_output=True, text=True)  # fmt: skip
    assert out.returncode == 1 and "no qlora-studio program" in out.stderr
    assert not installed.exists()
