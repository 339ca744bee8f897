"""Dataset archives: a downloaded ``.zip`` or tar checked member by member, then extracted once.

:func:`~qlora_engine.data.sources.open_source` hands an archive here. Nothing is written
until every member has passed: no absolute paths, no ``..``, no symbolic or hard links, no
device files or fifos, and a declared uncompressed total that fits the free space of the
cache and is not an absurd multiple of the archive's own size (a zip bomb). A refusal is a
:class:`DataError` naming the archive and the member. Tars are then extracted through the
standard library's ``data`` filter as well, so a trick we did not think of still stops
there; zip has no such filter, so its members are written by us, one checked path at a time.

The files land in ``cache_dir()/archives/<sha256 of the archive, short>``. They are written
into a temporary sibling folder that is renamed only when complete (with a marker holding
the full hash), so a process killed halfway never leaves a folder that gets used; the next
open removes its leftovers. Opening the same archive again reuses the folder. Archives
inside the archive are not extracted.

:func:`data_inside` then picks what to read: the one data file, or the one ``save_to_disk``
folder. Several, or none, is a :class:`DataError` that says what is there.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import tarfile
import time
import zipfile
from pathlib import Path
from typing import Any

from qlora_engine.data.kinds import ACCEPTED_FILES, kind_by_name
from qlora_engine.errors import DataError

ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tbz", ".tar.xz", ".txz")
# Office documents are zip files too; they keep the "unknown file type" answer instead of being unpacked.
DOCUMENT_SUFFIXES = (".xlsx", ".xlsm", ".docx", ".pptx", ".ods", ".odt", ".odp", ".epub")
MAX_RATIO = 200  # uncompressed : archive size. Text data compresses 5-20 times; a zip bomb, a thousand.
RATIO_FLOOR = 1 << 30  # only archives declaring more than this are refused for their ratio: small ones harm nothing
KEEP_EXTRACTED = 4  # newest extracted archives kept in the cache
MARKER = ".qlora-extracted.json"
LISTED = 10  # files named in an error message
_IGNORED = re.compile(r"^(__macosx|\..*|thumbs\.db|desktop\.ini)$", re.IGNORECASE)
# Text files that come with a data set rather than being it (README.md, LICENSE-MIT.txt, ...).
_ABOUT = re.compile(
    r"^(readme|licen[cs]e|copying|notice|changelog|authors|contributing|citation)([^a-z]|$)", re.IGNORECASE
)
_REFUSED_HINT = (
    "The archive may be malicious or made by a broken tool. Nothing was extracted. If you trust it, "
    "unpack the data file yourself and point data.path at it."
)


def is_archive(path: Path) -> bool:
    """True for a zip or tar file: by its name, or by its first bytes when the name says nothing."""
    name = path.name.lower()
    if name.endswith(ARCHIVE_SUFFIXES):
        return True
    if kind_by_name(name) or name.endswith(DOCUMENT_SUFFIXES):
        return False
    try:
        with open(path, "rb") as fh:
            head = fh.read(512)
    except OSError:
        return False
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")) or head[257:262] == b"ustar":
        return True
    if head.startswith((b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")):
        # A compressed tar, or one compressed data file (read as before): only the tar header tells.
        try:
            return tarfile.is_tarfile(path)
        except (OSError, EOFError):
            return False
    return False


def extract(archive: Path) -> Path:
    """The folder holding ``archive``'s files: extracted now, or by an earlier open of the same bytes.

    Raises:
        DataError: a member is unsafe (named), the archive is unreadable, encrypted or too large.
    """
    from qlora_engine.checkpoint import file_sha256  # lazy: checkpoint imports platformdirs (paths)
    from qlora_engine.paths import cache_dir, sweep_interrupted  # lazy: platformdirs; data is on the CLI's start-up

    digest = file_sha256(archive)
    cache = cache_dir()
    root = cache / "archives"
    dest = root / digest[:16]
    if _complete(dest, digest):
        os.utime(dest)  # recently used: pruned last
        return dest
    with _Reader(archive) as reader:
        sizes = reader.check(dest)  # every member, before anything is written
        _check_size(archive, sizes, cache)
        root.mkdir(exist_ok=True)
        sweep_interrupted(root)  # partial extractions of processes that died
        tmp = root / f".{dest.name}.{os.getpid()}.{time.monotonic_ns()}.partial"
        tmp.mkdir()
        try:
            reader.extract_into(tmp)
            (tmp / MARKER).write_text(json.dumps({"archive": archive.name, "sha256": digest}), encoding="utf-8")
            _publish(tmp, dest, digest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    _prune(root, keep=dest)
    return dest


def data_inside(folder: Path, archive: Path) -> Path:
    """The one data file or ``save_to_disk`` folder among an extracted archive's files.

    Ignored: ``__MACOSX/``, dotfiles and README/LICENSE-like files. Archives inside are files
    like any other, never extracted.

    Raises:
        DataError: several candidates (listed, with the folder to pick one from) or none.
    """
    found: list[Path] = []
    nested: list[Path] = []
    other: list[Path] = []
    for here, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not _IGNORED.match(d))
        if "dataset_info.json" in files or "dataset_dict.json" in files:
            found.append(Path(here))  # its own files (state.json, ...) are not data files
            dirs[:] = []
            continue
        for name in sorted(files):
            if _IGNORED.match(name):
                continue
            path = Path(here) / name
            kind = kind_by_name(name)
            if kind is not None and not (kind == "text" and _ABOUT.match(name)):
                found.append(path)
            elif name.lower().endswith(ARCHIVE_SUFFIXES):
                nested.append(path)
            else:
                other.append(path)
    if len(found) == 1:
        return found[0]

    def listing(paths: list[Path]) -> str:
        names = [p.relative_to(folder).as_posix() + ("/ (saved dataset)" if p.is_dir() else "") for p in paths]
        more = f" and {len(names) - LISTED} more" if len(names) > LISTED else ""
        return ", ".join(names[:LISTED]) + more

    if found:
        raise DataError(
            f"holds {len(found)} data sets; cannot tell which to train on: {listing(found)}.",
            hint=(
                f"Extract it into a folder of your own and point data.path at one of them (e.g. "
                f"{found[0].relative_to(folder).as_posix()}); the copy in {folder} is a cache and may be removed."
            ),
            file=archive,
        )
    contents = f"{len(nested + other)} other files: {listing(nested + other)}" if nested or other else "no files"
    message = f"no data file of an accepted kind inside; it holds {contents}."
    if nested:
        message += " Archives inside an archive are not extracted."
    raise DataError(message, hint=f"Accepted inputs: {ACCEPTED_FILES}.", file=archive)


# -- reading zip and tar --------------------------------------------------------------------------


class _Reader:
    """One open archive, zip or tar: ``check()`` every member, then ``extract_into()`` a folder."""

    def __init__(self, archive: Path) -> None:
        self.archive = archive
        self.zip: zipfile.ZipFile | None = None
        self.tar: tarfile.TarFile | None = None
        try:
            if zipfile.is_zipfile(archive):
                self.zip = zipfile.ZipFile(archive)
            else:
                self.tar = tarfile.open(archive, "r:*")  # noqa: SIM115 - closed by __exit__
        except (zipfile.BadZipFile, tarfile.TarError, OSError, EOFError) as e:
            raise DataError(
                f"not a readable zip or tar archive ({e}).",
                hint="The download may be incomplete or damaged; fetch it again.",
                file=archive,
            ) from None
        self._members: list[Any] = []

    def __enter__(self) -> _Reader:
        return self

    def __exit__(self, *exc: object) -> None:
        (self.zip or self.tar).close()  # type: ignore[union-attr]

    def check(self, dest: Path) -> list[tuple[str, int]]:
        """(name, declared size) of every file; raises DataError at the first unsafe member."""
        if self.zip is not None:
            return self._check_zip()
        if not hasattr(tarfile, "data_filter"):
            raise DataError(
                "tar archives are extracted only with Python's extraction filters (Python 3.10.12, 3.11.4 or later).",
                hint="Update Python, or unpack the archive yourself and point data.path at the data file.",
                file=self.archive,
            )
        return self._check_tar(dest)

    def _check_zip(self) -> list[tuple[str, int]]:
        assert self.zip is not None
        sizes = []
        for info in self.zip.infolist():
            kind = stat.S_IFMT(info.external_attr >> 16)  # Unix file type, when the zip records one
            why = _name_problem(info.filename)
            if why is None and kind == stat.S_IFLNK:
                why = "a symbolic link"
            elif why is None and kind not in (0, stat.S_IFREG, stat.S_IFDIR):
                why = "a device file, fifo or socket"
            if why is not None:
                raise _refused(self.archive, info.filename, why)
            if info.flag_bits & 0x1:
                raise DataError(
                    f"member {info.filename!r} is encrypted (password-protected).",
                    hint="Unpack the archive yourself with its password and point data.path at the data file.",
                    file=self.archive,
                )
            self._members.append(info)
            if not info.is_dir():
                sizes.append((info.filename, info.file_size))
        return sizes

    def _check_tar(self, dest: Path) -> list[tuple[str, int]]:
        assert self.tar is not None
        try:
            members = self.tar.getmembers()  # reads (and decompresses) the whole archive, writes nothing
        except (tarfile.TarError, OSError, EOFError) as e:
            raise DataError(
                f"not a readable tar archive ({e}).",
                hint="The download may be incomplete or damaged; fetch it again.",
                file=self.archive,
            ) from None
        for m in members:
            why = _name_problem(m.name)
            if why is None and m.issym():
                why = f"a symbolic link (to {m.linkname!r})"
            elif why is None and m.islnk():
                why = f"a hard link (to {m.linkname!r})"
            elif why is None and (m.ischr() or m.isblk()):
                why = "a device file"
            elif why is None and m.isfifo():
                why = "a fifo (named pipe)"
            elif why is None and not (m.isfile() or m.isdir()):
                why = "not a regular file or folder"
            if why is None:
                try:  # the standard library's own verdict, for anything the checks above missed
                    tarfile.data_filter(m, str(dest))
                except tarfile.FilterError as e:
                    why = str(e)
            if why is not None:
                raise _refused(self.archive, m.name, why)
        self._members = members
        return [(m.name, m.size) for m in members if m.isfile()]

    def extract_into(self, folder: Path) -> None:
        if self.tar is not None:
            try:
                self.tar.extractall(folder, members=self._members, filter="data")
            except tarfile.FilterError as e:
                raise _refused(self.archive, e.tarinfo.name, str(e)) from None
            except (tarfile.TarError, OSError, EOFError) as e:
                raise DataError(f"extracting into {folder} failed ({e}).", file=self.archive) from None
            return
        assert self.zip is not None
        for info in self._members:
            target = folder.joinpath(*_parts(info.filename))
            try:
                if info.is_dir() or info.filename.endswith("\\"):  # a folder, also as Windows tools name it
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                with self.zip.open(info) as src, open(target, "wb") as out:
                    shutil.copyfileobj(src, out, 1 << 20)
            except (zipfile.BadZipFile, NotImplementedError, OSError, EOFError) as e:
                raise DataError(f"extracting member {info.filename!r} failed ({e}).", file=self.archive) from None


def _name_problem(name: str) -> str | None:
    """Why a member name must not be extracted, or None. Both slashes count: the zip may come from Windows."""
    if not name or "\x00" in name:
        return "an empty or invalid name"
    if name.startswith(("/", "\\")) or re.match(r"[A-Za-z]:", name):
        return "an absolute path"
    if ".." in re.split(r"[\\/]", name):
        return "a path that climbs out of its folder ('..')"
    return None


def _parts(name: str) -> list[str]:
    return [p for p in re.split(r"[\\/]", name) if p not in ("", ".")]


def _refused(archive: Path, member: str, why: str) -> DataError:
    return DataError(f"refused to extract member {member!r}: {why}.", hint=_REFUSED_HINT, file=archive)


def _check_size(archive: Path, sizes: list[tuple[str, int]], cache: Path) -> None:
    # The declared sizes bound what is written: zipfile stops each member at its declared size
    # (the CRC check then fails), and a tar member is exactly its header's size.
    from qlora_engine.checkpoint import fmt_bytes  # lazy: see extract()

    if not sizes:
        return
    total = sum(size for _, size in sizes)
    largest, largest_size = max(sizes, key=lambda s: s[1])
    packed = archive.stat().st_size
    if total > RATIO_FLOOR and total > MAX_RATIO * packed:
        raise DataError(
            f"declares {fmt_bytes(total)} of content in {fmt_bytes(packed)} ({total / packed:,.0f} times its "
            f"size; largest member {largest!r}, {fmt_bytes(largest_size)}): a zip bomb, not a data set. "
            "Nothing was extracted.",
            hint=_REFUSED_HINT,
            file=archive,
        )
    free = shutil.disk_usage(cache).free
    if total > free:
        raise DataError(
            f"unpacks to {fmt_bytes(total)} (largest member {largest!r}, {fmt_bytes(largest_size)}), "
            f"more than the {fmt_bytes(free)} free on the disk of {cache}. Nothing was extracted.",
            hint="Free some space, or unpack the data file onto a disk with room and point data.path at it.",
            file=archive,
        )


# -- the cache folder -----------------------------------------------------------------------------


def _complete(dest: Path, digest: str) -> bool:
    try:
        return json.loads((dest / MARKER).read_text(encoding="utf-8")).get("sha256") == digest
    except (OSError, ValueError, AttributeError):
        return False


def _publish(tmp: Path, dest: Path, digest: str) -> None:
    """Rename the finished extraction into place; another process may have finished the same archive first."""
    if dest.exists() and not _complete(dest, digest):
        shutil.rmtree(dest, ignore_errors=True)  # not a finished extraction (no marker): never used
    try:
        tmp.rename(dest)
    except OSError:
        if not _complete(dest, digest):
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def _prune(root: Path, keep: Path) -> None:
    done = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and p != keep]
    done.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    for old in done[KEEP_EXTRACTED - 1 :]:
        shutil.rmtree(old, ignore_errors=True)
