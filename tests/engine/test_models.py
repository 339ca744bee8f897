"""Model references: inspection without weights, safety refusals, LoRA targeting."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qlora_engine.errors import ConfigError, ModelError
from qlora_engine.events import ListSink
from qlora_engine.models import inspect_model
from qlora_engine.runner import build_trainer


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qlora_engine", *args], capture_output=True, text=True)


def test_inspect_model_reads_config_and_tokenizer_only(tiny_model_dir, tmp_path):
    # Without its weights file the folder still inspects: nothing reads the weights.
    folder = tmp_path / "no-weights"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "model.safetensors").unlink()
    info = inspect_model(str(folder))
    assert info.architecture == "LlamaForCausalLM"
    assert info.num_layers == 2 and info.hidden_size == 64 and info.vocab_size == 384
    assert info.linear_modules == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert info.attention_modules == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert info.mlp_modules == ["gate_proj", "up_proj", "down_proj"]
    assert info.has_chat_template
    assert not info.usable and "no weight files" in info.problems[0]


def test_inspect_model_cli_json(tiny_model_dir, tiny_model_no_template_dir):
    out = cli("inspect-model", str(tiny_model_dir), "--json")
    assert out.returncode == 0, out.stderr
    facts = json.loads(out.stdout)
    assert facts["usable"] and facts["weights_format"] == "safetensors"
    assert facts["num_parameters"] > 100_000
    plain = json.loads(cli("inspect-model", str(tiny_model_no_template_dir), "--json").stdout)
    assert plain["has_chat_template"] is False


@pytest.fixture
def pickle_only_dir(tiny_model_dir, tmp_path):
    folder = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"not really a pickle, never opened")
    return folder


def test_pickle_only_weights_are_refused(pickle_only_dir, tiny_cfg):
    out = cli("inspect-model", str(pickle_only_dir))
    assert out.returncode == 3 and "pickle" in out.stderr
    with pytest.raises(ModelError, match="pickle") as info:
        build_trainer(tiny_cfg(f"model.ref={pickle_only_dir}"), ListSink()).setup()
    assert "safetensors" in info.value.hint


def test_remote_code_models_are_refused_with_the_switch_named(tmp_path):
    folder = tmp_path / "remote"
    folder.mkdir()
    (folder / "config.json").write_text(
        json.dumps({"model_type": "my_custom_arch", "auto_map": {"AutoConfig": "configuration_my.MyConfig"}})
    )
    (folder / "configuration_my.py").write_text("raise SystemExit('this code must never run')\n")
    with pytest.raises(ModelError, match="trust_remote_code") as info:
        inspect_model(str(folder))
    assert "model.trust_remote_code" in info.value.hint


def test_hub_id_offline_gives_a_clear_message():
    with pytest.raises(ModelError, match="could not be downloaded.*offline"):
        inspect_model("no-such-org/no-such-model")


def test_missing_paths_are_named(tmp_path):
    with pytest.raises(ModelError, match="GGUF file not found"):
        inspect_model(str(tmp_path / "x.gguf"))
    with pytest.raises(ModelError, match="no such model folder"):
        inspect_model(str(tmp_path / "nothing" / "here"))


def test_unknown_target_modules_list_the_real_ones(tiny_cfg):
    with pytest.raises(ConfigError, match=r"\['qkv'\] not in this model.*q_proj"):
        build_trainer(tiny_cfg("lora.target_modules=[qkv]"), ListSink()).setup()
    with pytest.raises(ConfigError, match="past the model's 2 layers"):
        build_trainer(tiny_cfg("lora.layers=0-5"), ListSink()).setup()


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["lora.target_modules=[attention]"], {"q_proj", "k_proj", "v_proj", "o_proj"}),
        (["lora.target_modules=[mlp]"], {"gate_proj", "up_proj", "down_proj"}),
        (["lora.target_modules=[q_proj, v_proj]", "lora.layers='1'"], {"q_proj", "v_proj"}),
    ],
)
def test_presets_and_layers_choose_the_adapted_modules(tiny_cfg, overrides, expected):
    trainer = build_trainer(tiny_cfg(*overrides), ListSink())
    trainer.setup()
    adapted = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in adapted} == expected
    if any("layers" in o for o in overrides):
        assert all(".layers.1." in n for n in adapted)
    trainer.cleanup()


def test_dora_and_rslora_switches_reach_peft(tiny_cfg):
    trainer = build_trainer(tiny_cfg("lora.use_dora=true", "lora.use_rslora=true", "lora.rank=4", "lora.alpha=8"), ListSink())
    trainer.setup()
    peft_cfg = trainer.model.peft_config["default"]
    assert peft_cfg.use_dora and peft_cfg.use_rslora
    assert any("lora_magnitude_vector" in n for n, _ in trainer.model.named_parameters())
    trainer.cleanup()


def test_fused_kernels_are_optional_and_refused_clearly_where_impossible(tiny_cfg):
    trainer = build_trainer(tiny_cfg("train.kernels=auto", "lora.layers=1"), ListSink())
    trainer.setup()
    assert trainer.facts["kernels"] == "none"  # no CUDA here: auto falls back to plain transformers
    # with checkpointing and only block 1 adapted, nothing below it needs a gradient
    assert not trainer.model.get_input_embeddings()._forward_hooks
    trainer.cleanup()
    with pytest.raises(ConfigError, match="train.kernels: 'liger' needs"):
        build_trainer(tiny_cfg("train.kernels=liger"), ListSink()).setup()


def test_processes_converting_one_gguf_at_once_all_get_the_one_cached_folder(tiny_model_dir, tmp_path):
    """Several processes dequantizing the same GGUF file at once (two test workers, the app and a
    terminal run): the first to finish fills the cache; the others find its folder there instead of
    failing on their rename (ENOTEMPTY), and leave no temporary folder behind."""
    sys.path.insert(0, str(Path(__file__).parent))
    from test_export_support import model_gguf

    gguf_file = model_gguf(tiny_model_dir, tmp_path / "tiny-f32.gguf", "f32", name="tiny")

    cache = tmp_path / "cache"
    # Each child, its imports done, waits for one file: all check the cache and begin converting before any finishes.
    go = tmp_path / "go"
    script = (
        "import os, time, pathlib\n"
        "from qlora_engine.model_ref import gguf_to_folder\n"
        "import transformers.modeling_gguf_pytorch_utils\n"
        f"go = pathlib.Path({str(go)!r})\n"
        "(go.parent / f'ready-{os.getpid()}').touch()\n"
        "while not go.exists(): time.sleep(0.01)\n"
        f"print(gguf_to_folder(pathlib.Path({str(gguf_file)!r})))\n"
    )
    env = {**os.environ, "QLORA_STUDIO_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    children = [
        subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    deadline = time.monotonic() + 120
    while len(list(tmp_path.glob("ready-*"))) < len(children) and time.monotonic() < deadline:
        time.sleep(0.05)
    go.touch()
    results = [c.communicate(timeout=300) for c in children]
    for c, (_, err) in zip(children, results, strict=True):
        assert c.returncode == 0, err[-2000:]
    folders = {out.strip() for out, _ in results}
    assert len(folders) == 1
    (folder,) = folders
    assert (Path(folder) / "config.json").is_file()
    assert [p.name for p in (cache / "gguf").iterdir()] == [Path(folder).name]  # no .tmp-<pid> left
