"""Off the happy path, faults: one table row per fault, its exact outcome asserted.

Hub tokens given every way a token can be given, searched for in every byte the engine wrote.
The base run they start from is the ``faults_base`` fixture (conftest.py).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # --import-mode=importlib: the helper module beside this file

from faults_support import (  # noqa: E402
    engine_env,
    every_file,
    fake_hub_snapshot,
    make_cfg,
)

from qlora_engine.events import ListSink, StepMetrics  # noqa: E402

pytestmark = pytest.mark.usefixtures("private_cache")


# -- 8. secrets never on disk ---------------------------------------------------------------------

TOKENS = {  # one distinct fake token per way a token can be given; none shaped like hf_..., so
    # only knowing the token (not a pattern) can mask it
    "HF_TOKEN env": "ZqEnvHfTokenValue000111222333",
    "HUGGING_FACE_HUB_TOKEN env": "ZqEnvHubTokenValue444555666777",
    "model ref URL": "ZqRefUrlTokenValue888999000aaa",
    "config model.token": "ZqConfigTokenValuebbbcccdddeee",
    "CLI model.token=": "ZqCliTokenValuefff000111222333",
}

DRIVER = r"""
import json, sys
from qlora_engine.cli import main
codes = {}
for name, argv in json.loads(sys.argv[1]):
    print(f"== {name}", flush=True)
    print(f"== {name}", file=sys.stderr, flush=True)
    codes[name] = main(argv)
print("CODES " + json.dumps(codes), flush=True)
"""


@pytest.fixture(scope="module")
def secrets_sweep(faults_base, tmp_path_factory):
    """A run, a resume, an export of each kind, a failed run and ``inspect-model --json``, with a
    token given every way at once; every command through the CLI's ``main()`` in one process."""
    root = tmp_path_factory.mktemp("secrets")
    hub = root / "hub-cache"
    fake_hub_snapshot(hub, "acme/tiny", faults_base["model"])
    ref = f"https://user:{TOKENS['model ref URL']}@huggingface.co/acme/tiny"
    run_dir = root / "run"
    first = make_cfg(faults_base["model"], faults_base["data"], run_dir, f"model.ref={ref}", "train.max_steps=2")
    first.save(root / "first.yaml")
    resume = make_cfg(faults_base["model"], faults_base["data"], run_dir, f"model.ref={ref}", "train.max_steps=3")
    text = (root / "first.yaml").read_text()  # the config file the user wrote holds a token too
    (root / "first.yaml").write_text(text.replace("token: null", f"token: {TOKENS['config model.token']}"))
    resume.save(root / "resume.yaml")
    (root / "resume.yaml").write_text(
        (root / "resume.yaml").read_text().replace("token: null", f"token: {TOKENS['config model.token']}")
    )
    bad = root / "bad.yaml"
    make_cfg(
        faults_base["model"],
        faults_base["data"],
        root / "failed-run",
        f"model.ref=https://user:{TOKENS['model ref URL']}@huggingface.co/acme/missing",
    ).save(bad)
    exports = {fmt: root / f"export-{fmt}" for fmt in ("adapter", "merged", "gguf")}
    commands = [
        ("train", ["train", str(root / "first.yaml"), f"model.token={TOKENS['CLI model.token=']}", "--events", "-"]),
        ("resume", ["train", str(root / "resume.yaml"), "--resume"]),
        *[
            (f"export {fmt}", ["export", str(run_dir), "--format", fmt, "--out", str(out)])
            for fmt, out in exports.items()
        ],
        ("failed run", ["train", str(bad), "--events", "-"]),
        ("inspect-model", ["inspect-model", ref, "--json"]),
    ]
    cache = root / "cache"
    env = engine_env(
        HF_TOKEN=TOKENS["HF_TOKEN env"],
        HUGGING_FACE_HUB_TOKEN=TOKENS["HUGGING_FACE_HUB_TOKEN env"],
        HF_HUB_CACHE=str(hub),
        QLORA_STUDIO_CACHE=str(cache),
    )
    out = subprocess.run(
        [sys.executable, "-c", DRIVER, json.dumps(commands)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=root,
    )
    codes = json.loads(out.stdout.rsplit("CODES ", 1)[1])
    written = every_file(run_dir, root / "failed-run", cache, *exports.values())
    return {
        "codes": codes,
        "stdout": out.stdout,
        "stderr": out.stderr,
        "written": written,
        "run": run_dir,
        "exports": exports,
    }


def test_the_sweep_ran_every_command(secrets_sweep):
    codes = secrets_sweep["codes"]
    assert {k: v for k, v in codes.items() if k != "failed run"} == {
        "train": 0,
        "resume": 0,
        "export adapter": 0,
        "export merged": 0,
        "export gguf": 0,
        "inspect-model": 0,
    }, secrets_sweep["stderr"][-3000:]
    assert codes["failed run"] == 2
    written = secrets_sweep["written"]
    assert len(written) > 40
    # the token-bearing values were written, masked: the reference in the config and the cards
    cfg_text = (secrets_sweep["run"] / "config.yaml").read_text()
    assert "ref: https://hf_***@huggingface.co/acme/tiny" in cfg_text and "token: hf_***" in cfg_text
    assert "hf_***" in (secrets_sweep["exports"]["adapter"] / "README.md").read_text()


@pytest.mark.parametrize("channel", list(TOKENS))
def test_a_token_given_this_way_is_in_no_byte_written(secrets_sweep, channel):
    token = TOKENS[channel].encode()
    assert token not in secrets_sweep["stdout"].encode() and token not in secrets_sweep["stderr"].encode()
    found = [str(p) for p in secrets_sweep["written"] if token in p.read_bytes()]
    assert found == []


def test_the_failed_run_logged_its_error_masked(secrets_sweep):
    failed = [
        json.loads(line)
        for line in secrets_sweep["stdout"].splitlines()
        if line.startswith("{") and '"run_failed"' in line
    ]
    assert failed and failed[0]["error_type"] == "ModelError" and "'acme/missing'" in failed[0]["message"]
    events = (secrets_sweep["run"].parent / "failed-run" / "events.jsonl").read_text()
    assert '"run_failed"' in events and "Traceback" in events  # the traceback was written, scrubbed


def test_a_token_inside_the_model_path_is_scrubbed_from_checkpoints_that_still_resume(
    faults_base, tmp_path, monkeypatch
):
    """peft writes the model's path into adapter_config.json and README.md: scrubbed before the
    manifest is written, so the scrubbed checkpoint still verifies and resumes."""
    from qlora_engine.runner import run

    token = "ZqPathTokenValue4444555566667777"
    monkeypatch.setenv("HF_TOKEN", token)
    model = tmp_path / token / "model"
    shutil.copytree(faults_base["model"], model)
    cfg = make_cfg(model, faults_base["data"], tmp_path / "run", "train.max_steps=1")
    run(cfg, ListSink())
    sink = ListSink()
    run(make_cfg(model, faults_base["data"], tmp_path / "run", "train.max_steps=2"), sink, resume=True)
    assert [e.step for e in sink.of(StepMetrics)] == [2]
    assert [str(p) for p in every_file(tmp_path / "run") if token.encode() in p.read_bytes()] == []
    assert "hf_***" in (tmp_path / "run" / "checkpoints" / "step-000001" / "adapter_config.json").read_text()
