"""``qlora-engine push``: an export goes to a model repository, the token is the user's and stays theirs.

The hub is :class:`fake_hub.FakeHub` on 127.0.0.1, reached through ``HF_ENDPOINT`` by the real
``huggingface_hub`` client in a real ``qlora-engine push`` process (nothing reaches the real hub).
What is checked: the files that arrive are exactly the export's, byte for byte; the token sent is
``HF_TOKEN`` or, without it, the saved login; the token appears in no file the push could write;
without a token, or given a run folder, nothing is sent.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from fake_hub import FakeHub  # noqa: E402
from test_export_support import trained_chat_run  # noqa: E402

TOKEN = "hf_" + "QlOrAsTuDiOtEsTtOkEn0123456789abcd"
SAVED = "hf_" + "SaVeDlOgInToKeN0123456789abcdefghi"


@pytest.fixture(scope="module")
def adapter_export(tmp_path_factory, tiny_model_dir) -> tuple[Path, Path]:
    from qlora_engine.export import export

    run = trained_chat_run(tmp_path_factory, tiny_model_dir)
    return run, export(run, "adapter", tmp_path_factory.mktemp("push") / "adapter")


def push(folder: Path, repo: str, hub: FakeHub, hf_home: Path, token: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_ENDPOINT=hub.url, HF_HOME=str(hf_home), HF_HUB_DISABLE_TELEMETRY="1")
    if token is not None:
        env["HF_TOKEN"] = token
    return subprocess.run(
        [sys.executable, "-m", "qlora_engine", "push", str(folder), repo],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def files_holding(root: Path, secret: str) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]


def test_push_uploads_exactly_the_export_with_the_environment_token(adapter_export, tmp_path):
    run, folder = adapter_export
    with FakeHub() as hub:
        proc = push(folder, "me/tiny-tuned", hub, tmp_path / "hf-home", TOKEN)
    assert proc.returncode == 0, proc.stderr
    assert "pushed: " in proc.stderr and "me/tiny-tuned" in proc.stderr
    want = {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    assert "adapter_model.safetensors" in want and "README.md" in want
    assert hub.files["me/tiny-tuned"] == want  # every file, nothing else, byte for byte
    assert hub.repos["me/tiny-tuned"]["visibility"] == "private"  # private unless --public
    assert hub.requests and all(auth == f"Bearer {TOKEN}" for _m, _p, auth in hub.requests)
    assert not hub.unknown
    # the token was written nowhere: not into the export, the run, or the client's home
    for root in (folder, run, tmp_path):
        assert files_holding(root, TOKEN) == []
    assert TOKEN not in proc.stdout + proc.stderr


def test_without_the_environment_token_the_saved_login_is_used(adapter_export, tmp_path):
    _run, folder = adapter_export
    home = tmp_path / "hf-home"
    home.mkdir()
    (home / "token").write_text(SAVED)  # what `hf auth login` leaves
    with FakeHub() as hub:
        proc = push(folder, "me/from-login", hub, home, None)
    assert proc.returncode == 0, proc.stderr
    assert {auth for _m, _p, auth in hub.requests} == {f"Bearer {SAVED}"}
    assert files_holding(tmp_path, SAVED) == [home / "token"]  # still only where the user put it


def test_no_token_or_a_run_folder_sends_nothing(adapter_export, tmp_path):
    run, folder = adapter_export
    with FakeHub() as hub:
        no_token = push(folder, "me/x", hub, tmp_path / "empty-home", None)
        run_folder = push(run, "me/x", hub, tmp_path / "empty-home", TOKEN)
    assert no_token.returncode == 2 and "no Hugging Face token" in no_token.stderr
    assert "HF_TOKEN" in no_token.stderr  # the hint says where a token comes from
    assert run_folder.returncode == 2 and "is a run folder, not an export" in run_folder.stderr
    assert hub.requests == []
