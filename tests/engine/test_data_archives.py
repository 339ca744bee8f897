"""Dataset archives: read once from the cache, and never a byte written outside their folder.

Every malicious archive here is built with the standard library. Each refusal must name
the archive and the member, and leave every file under the test's folder as it was.
"""

from __future__ import annotations

import io
import json
import stat
import subprocess
import sys
import tarfile
import zipfile
from collections import namedtuple
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from qlora_engine.checkpoint import file_sha256
from qlora_engine.cli import main
from qlora_engine.config import TrainConfig, validate
from qlora_engine.data import archives, prepare_data
from qlora_engine.data.sources import open_source
from qlora_engine.errors import DataError

ROWS = '{"text": "hello there"}\n{"text": "general kenobi"}\n'
DiskUsage = namedtuple("DiskUsage", "total used free")


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QLORA_STUDIO_CACHE", str(tmp_path / "cache"))


def make_zip(path: Path, members: dict[str, str | bytes]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)  # a plain name is stored as given: no cleaning of '..' or '/'
    return path


def make_tar(path: Path, members: list[tarfile.TarInfo | tuple[str, str]], mode: str = "w") -> Path:
    with tarfile.open(path, mode) as tf:
        for m in members:
            if isinstance(m, tarfile.TarInfo):
                tf.addfile(m)
            else:
                data = m[1].encode()
                info = tarfile.TarInfo(m[0])
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return path


def special(name: str, kind: bytes, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    info.devmajor, info.devminor = 1, 3
    return info


def open_path(path: Path):
    return open_source(str(path), path)


def all_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_symlink() or not p.is_dir())


def extracted(tmp_path: Path) -> list[Path]:
    root = tmp_path / "cache" / "archives"
    return sorted(root.iterdir()) if root.exists() else []


# -- reading ----------------------------------------------------------------------------------------


def test_a_zip_with_one_data_file_is_read_and_both_names_are_in_the_label(tmp_path):
    archive = make_zip(
        tmp_path / "train.zip",
        {
            "data/train.jsonl": ROWS,
            "README.md": "# my data\n",
            "LICENSE-MIT.txt": "MIT\n",
            "notes/CHANGELOG.md": "v1\n",
            "__MACOSX/data/._train.jsonl": "resource fork",
            "data/.DS_Store": "finder",
        },
    )
    src = open_path(archive)
    assert src.label == f"{archive} › data/train.jsonl"
    assert src.kind == "jsonl"
    assert [r.data for r in src.rows()] == [{"text": "hello there"}, {"text": "general kenobi"}]
    (folder,) = extracted(tmp_path)
    assert src.path == folder / "data" / "train.jsonl"


@pytest.mark.parametrize(
    ("name", "mode"),
    [("d.tar", "w"), ("d.tar.gz", "w:gz"), ("d.tgz", "w:gz"), ("d.tar.bz2", "w:bz2"), ("d.tar.xz", "w:xz")],
)
def test_every_tar_flavour_is_read(tmp_path, name, mode):
    archive = make_tar(tmp_path / name, [("set/rows.csv", "text\nhi\nthere\n")], mode)
    src = open_path(archive)
    assert src.label == f"{archive} › set/rows.csv"
    assert [r.data for r in src.rows()] == [{"text": "hi"}, {"text": "there"}]


@pytest.mark.parametrize("mode", ["zip", "w", "w:gz"])
def test_an_archive_without_an_extension_is_known_by_its_bytes(tmp_path, mode):
    path = tmp_path / "download"
    if mode == "zip":
        make_zip(path, {"train.jsonl": ROWS})
    else:
        make_tar(path, [("train.jsonl", ROWS)], mode)
    assert open_path(path).label == f"{path} › train.jsonl"


def test_a_gzipped_data_file_is_still_one_file_not_an_archive(tmp_path):
    import gzip

    path = tmp_path / "rows.gz"
    path.write_bytes(gzip.compress(ROWS.encode()))
    src = open_path(path)
    assert src.label == str(path) and src.kind == "jsonl"
    assert extracted(tmp_path) == []


def test_a_saved_dataset_inside_a_zip_is_opened(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"text": ["a", "b", "c"]}).save_to_disk(str(tmp_path / "saved" / "ds"))
    archive = tmp_path / "saved.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for p in sorted((tmp_path / "saved").rglob("*")):
            zf.write(p, p.relative_to(tmp_path / "saved").as_posix())
    src = open_path(archive)
    assert src.kind == "saved" and src.label == f"{archive} › ds"
    assert [r.data["text"] for r in src.rows()] == ["a", "b", "c"]


def test_a_bad_row_inside_an_archive_names_the_archive_the_member_and_the_line(tmp_path):
    archive = make_zip(tmp_path / "train.zip", {"train.jsonl": '{"text": "ok"}\n{"text": broken\n'})
    with pytest.raises(DataError, match=r"train\.zip › train\.jsonl:2: not valid JSON"):
        list(open_path(archive).rows())


# -- extracted once -----------------------------------------------------------------------------------


def test_a_second_open_reuses_the_extraction(tmp_path, monkeypatch):
    archive = make_zip(tmp_path / "train.zip", {"train.jsonl": ROWS})
    calls = []
    real = archives._Reader.extract_into
    monkeypatch.setattr(archives._Reader, "extract_into", lambda self, f: calls.append(f) or real(self, f))
    first = open_path(archive)
    mtime = first.path.stat().st_mtime_ns
    second = open_path(archive)
    assert len(calls) == 1
    assert second.path == first.path and second.path.stat().st_mtime_ns == mtime
    assert second.content_hash() == first.content_hash()
    # Other bytes under the same name are another archive.
    make_zip(archive, {"train.jsonl": ROWS + '{"text": "third"}\n'})
    assert len(list(open_path(archive).rows())) == 3
    assert len(calls) == 2 and len(extracted(tmp_path)) == 2


def test_an_interrupted_extraction_leaves_nothing_that_is_used(tmp_path, monkeypatch):
    archive = make_zip(tmp_path / "train.zip", {"a/train.jsonl": ROWS, "b/other.bin": b"x" * 4096})

    def killed(src, out, length=0):
        out.write(src.read(10))
        raise KeyboardInterrupt  # as if the process were stopped halfway

    monkeypatch.setattr(archives.shutil, "copyfileobj", killed)
    with pytest.raises(KeyboardInterrupt):
        open_path(archive)
    assert extracted(tmp_path) == []  # neither a finished folder nor a partial one
    monkeypatch.undo()
    monkeypatch.setenv("QLORA_STUDIO_CACHE", str(tmp_path / "cache"))
    assert open_path(archive).label.endswith("› a/train.jsonl")


def test_leftovers_of_a_killed_process_are_removed_and_an_unmarked_folder_is_replaced(tmp_path):
    archive = make_zip(tmp_path / "train.zip", {"train.jsonl": ROWS})
    digest = file_sha256(archive)
    root = tmp_path / "cache" / "archives"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    partial = root / f".{digest[:16]}.{int(dead.stdout)}.1.partial"
    (partial / "half").mkdir(parents=True)
    unmarked = root / digest[:16]  # a folder where the extraction should be, without the completion marker
    unmarked.mkdir()
    (unmarked / "train.jsonl").write_text('{"text": "not from this archive"}\n')
    src = open_path(archive)
    assert not partial.exists()
    assert [r.data["text"] for r in src.rows()] == ["hello there", "general kenobi"]
    assert json.loads((unmarked / archives.MARKER).read_text())["sha256"] == digest


# -- refused: nothing written outside, the archive and the member named -----------------------------------


def _outside(tmp_path: Path) -> Path:
    return tmp_path / "outside"


MALICIOUS = {
    "zip absolute path": lambda t: make_zip(t / "evil.zip", {f"{_outside(t)}/abs.jsonl": ROWS}),
    "zip climbs out": lambda t: make_zip(t / "evil.zip", {"ok.jsonl": ROWS, "../../../evil.jsonl": ROWS}),
    "zip climbs out with backslashes": lambda t: make_zip(t / "evil.zip", {"..\\..\\..\\evil.jsonl": ROWS}),
    "zip drive letter": lambda t: make_zip(t / "evil.zip", {"C:/evil.jsonl": ROWS}),
    "tar absolute path": lambda t: make_tar(t / "evil.tar", [(f"{_outside(t)}/abs.jsonl", ROWS)]),
    "tar climbs out": lambda t: make_tar(t / "evil.tar.gz", [("../../../evil.jsonl", ROWS)], "w:gz"),
    "tar symlink": lambda t: make_tar(
        t / "evil.tar", [special("data", tarfile.SYMTYPE, str(_outside(t))), ("data/evil.jsonl", ROWS)]
    ),
    "tar relative symlink": lambda t: make_tar(t / "evil.tar", [special("data", tarfile.SYMTYPE, "sub")]),
    "tar hardlink": lambda t: make_tar(t / "evil.tar", [special("data", tarfile.LNKTYPE, str(t / "secret.txt"))]),
    "tar device": lambda t: make_tar(t / "evil.tar", [special("null", tarfile.CHRTYPE)]),
    "tar block device": lambda t: make_tar(t / "evil.tar", [special("disk", tarfile.BLKTYPE)]),
    "tar fifo": lambda t: make_tar(t / "evil.tar", [special("pipe", tarfile.FIFOTYPE)]),
}
MEMBERS = {
    "zip absolute path": ("{outside}/abs.jsonl", "absolute path"),
    "zip climbs out": ("../../../evil.jsonl", "climbs out"),
    "zip climbs out with backslashes": ("..\\\\..\\\\..\\\\evil.jsonl", "climbs out"),
    "zip drive letter": ("C:/evil.jsonl", "absolute path"),
    "tar absolute path": ("{outside}/abs.jsonl", "absolute path"),
    "tar climbs out": ("../../../evil.jsonl", "climbs out"),
    "tar symlink": ("data", "symbolic link"),
    "tar relative symlink": ("data", "symbolic link"),
    "tar hardlink": ("data", "hard link"),
    "tar device": ("null", "device file"),
    "tar block device": ("disk", "device file"),
    "tar fifo": ("pipe", "fifo"),
}


@pytest.mark.parametrize("case", list(MALICIOUS))
def test_a_malicious_archive_is_refused_naming_the_member_and_nothing_is_written(tmp_path, case):
    (tmp_path / "secret.txt").write_text("keep me")
    archive = MALICIOUS[case](tmp_path)
    before = all_files(tmp_path)
    with pytest.raises(DataError) as e:
        open_path(archive)
    member, why = MEMBERS[case]
    member = member.format(outside=_outside(tmp_path))
    assert str(e.value).startswith(f"{archive}: refused to extract member '{member}': ")
    assert why in str(e.value) and "Nothing was extracted" in e.value.hint
    assert all_files(tmp_path) == before
    assert extracted(tmp_path) == []
    assert not _outside(tmp_path).exists() and (tmp_path / "secret.txt").read_text() == "keep me"


def test_a_zip_symlink_entry_is_refused(tmp_path):
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        link = zipfile.ZipInfo("data")
        link.create_system = 3  # Unix: the high 16 bits of external_attr are the file mode
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(link, str(_outside(tmp_path)))
        zf.writestr("data/evil.jsonl", ROWS)
    before = all_files(tmp_path)
    with pytest.raises(DataError, match=r"evil\.zip: refused to extract member 'data': a symbolic link"):
        open_path(archive)
    assert all_files(tmp_path) == before and extracted(tmp_path) == []


def test_tars_need_the_extraction_filters(tmp_path, monkeypatch):
    archive = make_tar(tmp_path / "d.tar", [("train.jsonl", ROWS)])
    monkeypatch.delattr(tarfile, "data_filter")
    with pytest.raises(DataError, match=r"d\.tar: tar archives are extracted only with Python's extraction filters"):
        open_path(archive)
    assert extracted(tmp_path) == []


def test_an_archive_larger_than_the_free_space_is_refused(tmp_path, monkeypatch):
    archive = make_zip(tmp_path / "big.zip", {"small.jsonl": ROWS, "big.jsonl": ROWS * 100})
    monkeypatch.setattr("shutil.disk_usage", lambda path: DiskUsage(total=1000, used=0, free=1000))
    with pytest.raises(DataError) as e:
        open_path(archive)
    assert str(e.value).startswith(f"{archive}: unpacks to ")
    assert "largest member 'big.jsonl'" in str(e.value) and "1.0 kB free on the disk of" in str(e.value)
    assert extracted(tmp_path) == []


def test_a_zip_bomb_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(archives, "RATIO_FLOOR", 0)  # a real bomb would take gigabytes to build here
    archive = make_zip(tmp_path / "bomb.zip", {"rows.jsonl": ROWS, "zeros.jsonl": b"\0" * (4 << 20)})
    with pytest.raises(
        DataError,
        match=r"bomb\.zip: declares 4\.2 MB of content in .* times its size; "
        r"largest member 'zeros\.jsonl'.*a zip bomb",
    ):
        open_path(archive)
    assert extracted(tmp_path) == []


def test_an_encrypted_or_damaged_archive_says_so(tmp_path):
    # zipfile cannot encrypt: set the "encrypted" flag bit in the local and the central header.
    data = bytearray(make_zip(tmp_path / "locked.zip", {"train.jsonl": ROWS}).read_bytes())
    data[data.find(b"PK\x03\x04") + 6] |= 0x1
    data[data.find(b"PK\x01\x02") + 8] |= 0x1
    archive = tmp_path / "locked.zip"
    archive.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"locked\.zip: member 'train\.jsonl' is encrypted"):
        open_path(archive)
    damaged = tmp_path / "cut.zip"
    damaged.write_bytes(make_zip(tmp_path / "whole.zip", {"train.jsonl": ROWS}).read_bytes()[:30])
    with pytest.raises(DataError, match=r"cut\.zip: not a readable zip or tar archive") as e:
        open_path(damaged)
    assert "incomplete" in e.value.hint


def test_a_zip_that_understates_a_size_writes_no_more_than_it_declares(tmp_path):
    data = bytearray(make_zip(tmp_path / "liar.zip", {"train.jsonl": ROWS * 100}).read_bytes())
    for header, offset in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):  # uncompressed size, local and central
        at = data.find(header) + offset
        data[at : at + 4] = (10).to_bytes(4, "little")
    archive = tmp_path / "liar.zip"
    archive.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"liar\.zip: extracting member 'train\.jsonl' failed \(Bad CRC-32"):
        open_path(archive)
    assert extracted(tmp_path) == []


# -- what is inside ------------------------------------------------------------------------------------


def test_several_data_files_are_listed_and_the_user_told_to_extract_and_pick_one(tmp_path):
    archive = make_zip(
        tmp_path / "many.zip", {f"part{i:02}.jsonl": ROWS for i in range(12)} | {"extra/dev.csv": "text\nx\n"}
    )
    with pytest.raises(DataError) as e:
        open_path(archive)
    (folder,) = extracted(tmp_path)
    msg = str(e.value)
    assert msg.startswith(f"{archive}: holds 13 data sets; cannot tell which to train on: part00.jsonl, part01.jsonl")
    assert msg.endswith("part09.jsonl and 3 more.") and "dev.csv" not in msg
    assert "Extract it into a folder of your own and point data.path at one of them (e.g. part00.jsonl)" in e.value.hint
    assert f"the copy in {folder} is a cache" in e.value.hint
    picked = folder / "part03.jsonl"
    assert open_path(picked).label == str(picked)


def test_no_data_inside_says_what_is_there_and_nested_archives_stay_packed(tmp_path):
    inner = make_zip(tmp_path / "inner.zip", {"train.jsonl": ROWS})
    archive = make_zip(tmp_path / "outer.zip", {"README.md": "hi", "data/inner.zip": inner.read_bytes(), "x.pdf": "%"})
    with pytest.raises(DataError) as e:
        open_path(archive)
    assert str(e.value) == (
        f"{archive}: no data file of an accepted kind inside; it holds 3 other files: data/inner.zip, README.md, "
        "x.pdf. Archives inside an archive are not extracted."
    )
    (folder,) = extracted(tmp_path)
    assert all_files(folder) == sorted([archives.MARKER, "README.md", "data/inner.zip", "x.pdf"])


def test_an_empty_archive_says_it_holds_no_files(tmp_path):
    archive = make_zip(tmp_path / "empty.zip", {})
    with pytest.raises(DataError, match=r"empty\.zip: no data file of an accepted kind inside; it holds no files\."):
        open_path(archive)


# -- end to end ----------------------------------------------------------------------------------------


def test_cli_inspect_data_on_a_zip_reports_the_member(tmp_path, capsys):
    archive = make_zip(tmp_path / "train.zip", {"data/train.jsonl": ROWS})
    assert main(["inspect-data", str(archive), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["source"] == f"{archive} › data/train.jsonl"
    assert result["source_kind"] == "jsonl" and result["format"] == "text"
    assert result["rows"] == 2 and result["usable_rows"] == 2


def test_prepare_data_reads_a_tar_gz_like_the_file_inside(tmp_path, tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    archive = make_tar(tmp_path / "train.tgz", [("train.jsonl", ROWS)], "w:gz")
    (tmp_path / "train.jsonl").write_text(ROWS)

    def cfg(path: Path) -> TrainConfig:
        c = TrainConfig()
        c.data.path, c.data.cache = str(path), False
        validate(c)
        return c

    packed = prepare_data(cfg(archive), tok)
    plain = prepare_data(cfg(tmp_path / "train.jsonl"), tok)
    assert packed.report["source"] == f"{archive} › train.jsonl"
    assert packed.report["rows"] == 2 and list(packed.train) == list(plain.train)
    assert packed.fingerprint == plain.fingerprint  # the same bytes are the same tokens
