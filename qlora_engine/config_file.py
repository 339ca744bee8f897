"""Reading a config file a user (or anyone) handed us, with limits: it cannot hang, blow up or lie.

A run config is a small YAML mapping. Everything else that can sit at that path is refused
with a :class:`~qlora_engine.errors.ConfigError` naming the file (and line) before it can do
harm:

- only a regular file is opened: a FIFO would block the read forever, a device never ends, a
  folder is a mistake; the check is made on the open descriptor (``O_NONBLOCK``, so opening a
  FIFO returns at once), so the file cannot be swapped between the check and the read;
- at most :data:`MAX_CONFIG_BYTES` are read;
- UTF-16/UTF-32 (a byte-order mark), NUL bytes (a binary file) and bytes that are not UTF-8 are
  refused with the line they are on;
- the YAML is composed with a nesting limit (:data:`MAX_DEPTH`; PyYAML's composer recurses, so
  ``[[[[...`` thousands deep would end in a ``RecursionError``) and a limit on the node count
  after aliases are expanded (:data:`MAX_NODES`: the "billion laughs" alias bomb is refused
  before anything is built from it, so no error message can ``repr`` it);
- every mapping key must be a plain name (no ``1:``, ``true:``, ``<<:`` merge or ``[a, b]:``),
  and no key may appear twice in one mapping (YAML says so; PyYAML keeps the last silently).

:func:`read_yaml` returns the data and the line of every ``section`` and ``section.field`` key,
so a later problem with a field can name its line.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import Any

import yaml

from qlora_engine.errors import ConfigError

MAX_CONFIG_BYTES = 1 << 20  # ours are ~6 KB with every comment; a megabyte is no config
MAX_DEPTH = 32  # ours nest three deep (section, field, a list or mapping value)
MAX_NODES = 20_000  # values after aliases are expanded; ours have about a hundred

_FILE_KINDS = (
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)
_BOMS = (
    (b"\xff\xfe\x00\x00", "UTF-32"),
    (b"\x00\x00\xfe\xff", "UTF-32"),
    (b"\xff\xfe", "UTF-16"),
    (b"\xfe\xff", "UTF-16"),
)
_STR_TAG = "tag:yaml.org,2002:str"


def read_regular_file(path: Path, *, limit: int, what: str = "config file") -> bytes:
    """The bytes of ``path`` if it is a readable regular file of at most ``limit`` bytes.

    Raises:
        ConfigError: ``file`` is the path; the text says what the path is instead.
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))
    except FileNotFoundError:
        raise ConfigError(f"{what} not found.", file=path) from None
    except IsADirectoryError:
        raise ConfigError(f"is a folder, not a {what}.", file=path) from None
    except PermissionError:
        raise ConfigError(
            "cannot be read (permission denied).", file=path, fix="Check the file's permissions."
        ) from None
    except OSError as e:
        raise ConfigError(f"cannot be opened ({e.strerror or e}).", file=path) from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = next((name for test, name in _FILE_KINDS if test(mode)), "not a regular file")
            raise ConfigError(f"is {kind}, not a {what}; only regular files are read.", file=path)
        chunks, size = [], 0
        while size <= limit:
            try:
                chunk = os.read(fd, min(1 << 16, limit + 1 - size))
            except OSError as e:
                if e.errno == errno.EISDIR:
                    raise ConfigError(f"is a folder, not a {what}.", file=path) from None
                raise ConfigError(f"cannot be read ({e.strerror or e}).", file=path) from None
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > limit:
            raise ConfigError(
                f"is larger than {limit // 1024} KiB; a {what} is a few kilobytes of YAML.",
                file=path,
                fix="Check that the path names the config file and not a data or model file.",
            )
        return b"".join(chunks)
    finally:
        os.close(fd)


def decode_text(data: bytes, path: Any) -> str:
    """UTF-8 text (a UTF-8 byte-order mark is dropped); anything else is refused naming the line."""
    for bom, name in _BOMS:
        if data.startswith(bom):
            raise ConfigError(
                f"the file is encoded as {name}, not UTF-8.",
                file=path,
                line=1,
                fix="Save it as UTF-8 (in most editors: Save As, encoding UTF-8).",
            )
    if b"\x00" in data:
        line = data.count(b"\n", 0, data.index(b"\x00")) + 1
        raise ConfigError(
            "the file holds NUL bytes: it is a binary file (or UTF-16 without a byte-order mark), not YAML text.",
            file=path,
            line=line,
            fix="Point at the run's .yaml config file.",
        )
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ConfigError(
            f"not UTF-8 text (byte 0x{data[e.start : e.start + 1].hex()}).",
            file=path,
            line=line,
            fix="Save the file as UTF-8.",
        ) from None


class _LimitedLoader(yaml.SafeLoader):
    """PyYAML's safe loader with a nesting limit (its composer is recursive)."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        self.depth += 1
        try:
            if self.depth > MAX_DEPTH:
                mark = self.peek_event().start_mark
                raise _Refused(f"nested more than {MAX_DEPTH} levels deep", mark.line + 1)
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


class _Refused(Exception):
    def __init__(self, what: str, line: int | None) -> None:
        super().__init__(what)
        self.what, self.line = what, line


def _check_tree(root: yaml.Node) -> dict[str, int]:
    """Refuse alias bombs, self-reference, duplicate and non-name keys; the lines of the keys.

    Returns ``{"lora": 12, "lora.rank": 14, ...}`` for the top two levels of mappings.
    """
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()

    def size(node: yaml.Node) -> int:  # nodes after alias expansion; depth is at most MAX_DEPTH
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in open_nodes:
            raise _Refused("an alias refers to the value that contains it", node.start_mark.line + 1)
        open_nodes.add(key)
        total = 1
        if isinstance(node, yaml.MappingNode):
            seen: dict[str, int] = {}
            for k, v in node.value:
                if not (isinstance(k, yaml.ScalarNode) and k.tag == _STR_TAG):
                    shown = k.value if isinstance(k, yaml.ScalarNode) else type(k).__name__
                    raise _Refused(
                        f"the key {str(shown)[:40]!r} is not a name; keys must be plain text "
                        "(merge keys '<<' and number or true/false keys are not read)",
                        k.start_mark.line + 1,
                    )
                if k.value in seen:
                    raise _Refused(
                        f"the key {k.value[:40]!r} appears twice in one mapping (first on line {seen[k.value]}); "
                        "only one can count, so neither is taken",
                        k.start_mark.line + 1,
                    )
                seen[k.value] = k.start_mark.line + 1
                total += 1 + size(v)
                if total > MAX_NODES:
                    break
        elif isinstance(node, yaml.SequenceNode):
            for v in node.value:
                total += size(v)
                if total > MAX_NODES:
                    break
        open_nodes.discard(key)
        sizes[key] = total
        if total > MAX_NODES:
            raise _Refused(
                f"more than {MAX_NODES:,} values once aliases are expanded (an alias bomb?)", node.start_mark.line + 1
            )
        return total

    size(root)
    lines: dict[str, int] = {}
    if isinstance(root, yaml.MappingNode):
        for k, v in root.value:
            lines[k.value] = k.start_mark.line + 1
            if isinstance(v, yaml.MappingNode):
                for fk, _ in v.value:
                    lines[f"{k.value}.{fk.value}"] = fk.start_mark.line + 1
    return lines


def load_yaml(text: str, source: Any = None) -> tuple[Any, dict[str, int]]:
    """One YAML document, read with the limits above: (the data, the line of each key).

    Raises:
        ConfigError: ``file`` is ``source``, ``line`` where the problem is.
    """
    loader = _LimitedLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None, {}
        lines = _check_tree(node)
        return loader.construct_document(node), lines
    except _Refused as e:
        raise ConfigError(e.what + ".", file=source, line=e.line) from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        what = " ".join(p for p in (e.context, e.problem) if p)
        raise ConfigError(
            f"not valid YAML: {what}. (Python object tags are never loaded.)",
            file=source,
            line=mark.line + 1 if mark else None,
        ) from None
    except yaml.YAMLError as e:
        raise ConfigError(f"not valid YAML ({str(e)[:200]}).", file=source) from None
    except RecursionError:  # a guard behind the guard: the depth limit should make this unreachable
        raise ConfigError("not valid YAML: nested too deeply to read.", file=source) from None
    finally:
        loader.dispose()


def read_yaml_file(path: Path) -> tuple[Any, dict[str, int]]:
    """A config file's YAML (see :func:`load_yaml`), read only if it is a regular file of sane size."""
    text = decode_text(read_regular_file(path, limit=MAX_CONFIG_BYTES), path)
    return load_yaml(text, path)
