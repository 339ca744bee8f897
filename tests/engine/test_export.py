"""Exports of a real trained run (tiny Llama, NF4 QLoRA on the CPU): the adapter and the merged model.

Every check reads the export back with an independent reader: the PEFT folder through plain
peft in a fresh Python process, the merged folder through plain transformers.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).parent))
from test_export_support import PROBE, trained_chat_run  # noqa: E402

from qlora_engine import scrub
from qlora_engine.config import TrainConfig, apply_overrides
from qlora_engine.errors import ModelError
from qlora_engine.events import ListSink, LogLine, PhaseChanged, read_events
from qlora_engine.export import ExportCancelled, ExportError, export, load_run
from qlora_engine.export.card import hyperparameter_rows
from qlora_engine.export.common import adapter_b_stats


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory, tiny_model_dir) -> Path:
    return trained_chat_run(tmp_path_factory, tiny_model_dir)


def fp_logits(base_dir: Path, adapter_dir: Path | None) -> torch.Tensor:
    """Logits of the full-precision base, with the adapter applied unmerged (or without it)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, str(adapter_dir))
    with torch.no_grad():
        return model(torch.tensor(PROBE)).logits


def qlora_logits(run_dir: Path, adapter: bool = True) -> torch.Tensor:
    """Logits of the model as trained: the 4-bit NF4 base plus the adapter (or with it disabled)."""
    from qlora_engine.generate import ChatModel

    chat = ChatModel.load(run_dir, device="cpu")
    with torch.no_grad(), chat.adapter_enabled(adapter):
        return chat.model(torch.tensor(PROBE)).logits


def no_temp_leftovers(folder: Path) -> bool:
    return not [p for p in folder.parent.iterdir() if p.name.startswith((".tmp-", ".old-"))]


# -- the adapter itself --------------------------------------------------------------------------


def test_trained_adapter_is_not_empty_and_changes_the_output(chat_run, tiny_model_dir):
    weights = load_file(chat_run / "adapter" / "adapter_model.safetensors")
    b = {k: v for k, v in weights.items() if ".lora_B." in k}
    assert len(b) == 2 * 7  # every projection of both blocks
    assert all(v.abs().max() > 0 for v in b.values()), "a LoRA B matrix stayed zero after training"
    assert adapter_b_stats(chat_run / "adapter") == {"b_matrices": 14, "zero_b_matrices": 0}
    tuned = fp_logits(tiny_model_dir, chat_run / "adapter")
    base = fp_logits(tiny_model_dir, None)
    assert (tuned - base).abs().max() > 1.0


# -- adapter export --------------------------------------------------------------------------------


def test_adapter_export_loads_with_plain_peft_in_a_fresh_process(chat_run, tiny_model_dir, tmp_path):
    out = export(chat_run, "adapter", tmp_path / "adapter-export")
    names = {p.name for p in out.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "README.md", "config.yaml", "tokenizer.json"} <= names
    assert (out / "config.yaml").read_bytes() == (chat_run / "config.yaml").read_bytes()
    code = textwrap.dedent(
        f"""
        import json, torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM
        base = AutoModelForCausalLM.from_pretrained({str(tiny_model_dir)!r}, dtype=torch.float32)
        model = PeftModel.from_pretrained(base, {str(out)!r})
        with torch.no_grad():
            print(json.dumps(model(torch.tensor({PROBE})).logits[0, -1].tolist()))
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    fresh = torch.tensor(json.loads(proc.stdout.strip().splitlines()[-1]))
    expected = fp_logits(tiny_model_dir, chat_run / "adapter")[0, -1]
    assert torch.allclose(fresh, expected, atol=1e-5)


def test_model_card_has_base_data_hyperparameters_losses_time_and_hardware(chat_run, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_NotARealTokenButSecret123")
    out = export(chat_run, "adapter", tmp_path / "a")
    card = (out / "README.md").read_text(encoding="utf-8")
    cfg = TrainConfig.load(chat_run / "config.yaml")
    assert cfg.model.ref in card
    assert cfg.data.path in card and "3 samples" in card
    for key, value in hyperparameter_rows(load_run(chat_run)):
        assert f"| `{key}` | {value} |" in card
    assert "| `lora.rank` | 16 |" in card and "| `optim.learning_rate` | 0.02 |" in card
    finished = [e for e in read_events(chat_run / "events.jsonl") if e.kind == "run_finished"][-1]
    assert f"final training loss: {finished.final_loss:.4f}" in card
    assert f"final evaluation loss: {finished.final_eval_loss:.4f}" in card
    assert "training time: 0 min" in card or "training time: 1 min" in card
    assert "hardware: cpu" in card and "optimizer steps: 20 of 20" in card
    for p in out.iterdir():  # a hub token in the environment never reaches an export
        assert b"hf_NotARealTokenButSecret123" not in p.read_bytes()


def test_untrained_adapter_is_flagged_in_the_card(chat_run, tmp_path):
    adapter = tmp_path / "zeroed"
    shutil.copytree(chat_run / "adapter", adapter)
    weights = load_file(adapter / "adapter_model.safetensors")
    save_file(
        {k: torch.zeros_like(v) if ".lora_B." in k else v for k, v in weights.items()},
        adapter / "adapter_model.safetensors",
    )
    shutil.copy2(chat_run / "config.yaml", adapter / "config.yaml")
    sink = ListSink()
    out = export(adapter, "adapter", tmp_path / "out", sink=sink)
    assert "every LoRA B matrix of this adapter is zero" in (out / "README.md").read_text()
    assert any(e.level == "warning" and "zero" in e.message for e in sink.of(LogLine))


# -- merged export ----------------------------------------------------------------------------------


def test_merged_model_loads_with_plain_transformers_and_matches_the_adapter(chat_run, tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    sink = ListSink()
    out = export(chat_run, "merged", tmp_path / "merged", sink=sink)
    assert any(e.phase == "exporting" for e in sink.of(PhaseChanged))
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32"  # the base's own dtype, not 4 bit
    assert not list(out.glob("*.bin")) and list(out.glob("*.safetensors"))
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        m = merged(torch.tensor(PROBE)).logits
    # Exactly the full-precision base with the adapter applied (up to float rounding of W + BA).
    assert (m - fp_logits(tiny_model_dir, chat_run / "adapter")).abs().max() < 1e-4
    # Against the model as trained (4-bit base + adapter) the gap is the base's own 4-bit rounding, no more,
    # and far below what the adapter changes.
    gap = (qlora_logits(chat_run) - m).abs().max()
    quant_gap = (qlora_logits(chat_run, adapter=False) - fp_logits(tiny_model_dir, None)).abs().max()
    effect = (fp_logits(tiny_model_dir, chat_run / "adapter") - fp_logits(tiny_model_dir, None)).abs().max()
    assert gap < 2 * quant_gap and gap < 0.5 * effect, (gap, quant_gap, effect)
    tok_files = {p.name for p in out.iterdir()}
    assert {"tokenizer.json", "README.md", "config.yaml"} <= tok_files


def test_merge_from_a_4bit_only_base_dequantizes_and_says_so(chat_run, tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qlora_engine import models

    cfg = TrainConfig.load(chat_run / "config.yaml")
    four_bit = tmp_path / "tiny-4bit"
    models.load_quantized_model(cfg, tiny_model_dir, torch.device("cpu"), torch.float32).save_pretrained(four_bit)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(four_bit)
    assert "quantization_config" in json.loads((four_bit / "config.json").read_text())
    info = load_run(chat_run)
    info.config = apply_overrides(info.config, [f"model.ref={four_bit}"])
    out = export(info, "merged", tmp_path / "merged")
    assert "only as a pre-quantized (bitsandbytes) 4-bit checkpoint" in (out / "README.md").read_text()
    merged = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        m = merged(torch.tensor(PROBE)).logits
    # Same NF4 weights as training used, so much closer to the QLoRA model than a full-precision merge is.
    quant_gap = (qlora_logits(chat_run, adapter=False) - fp_logits(tiny_model_dir, None)).abs().max()
    assert (qlora_logits(chat_run) - m).abs().max() < 0.25 * quant_gap


# -- output folder rules ------------------------------------------------------------------------------


def test_exports_never_overwrite_unless_told_and_write_atomically(chat_run, tmp_path):
    out = tmp_path / "exists"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="already exists"):
        export(chat_run, "adapter", out)
    assert (out / "keep.txt").read_text() == "mine"
    export(chat_run, "adapter", out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "adapter_model.safetensors").is_file()
    assert no_temp_leftovers(out)

    calls = {"n": 0}

    def stop_inside_the_write() -> bool:
        calls["n"] += 1
        return calls["n"] > 2

    target = tmp_path / "cancelled"
    with pytest.raises(ExportCancelled):
        export(chat_run, "merged", target, should_stop=stop_inside_the_write)
    assert not target.exists() and no_temp_leftovers(target)

    for bad in (chat_run, chat_run / "adapter", chat_run.parent):
        with pytest.raises(ExportError, match="run being exported"):
            export(chat_run, "adapter", bad, overwrite=True)
    assert (chat_run / "adapter" / "adapter_model.safetensors").is_file()


def test_sources_run_adapter_checkpoint_and_exported_adapter(chat_run, tmp_path):
    ckpt = sorted((chat_run / "checkpoints").iterdir())[-1]
    for src in (chat_run, chat_run / "adapter", ckpt):
        info = load_run(src)
        assert info.run_dir == chat_run and info.has_config and info.facts.finished
    from_ckpt = export(ckpt, "adapter", tmp_path / "from-checkpoint")  # a checkpoint has no tokenizer of its own
    names = {p.name for p in from_ckpt.iterdir()}
    assert {"adapter_model.safetensors", "tokenizer.json", "config.yaml"} <= names
    assert not names & {"optimizer.pt", "rng.pt", "scheduler.pt", "trainer_state.json", "qlora_checkpoint.json"}
    exported = export(chat_run, "adapter", tmp_path / "exp")
    info = load_run(exported)
    assert (
        info.run_dir is None
        and info.has_config
        and info.config.model.ref == TrainConfig.load(chat_run / "config.yaml").model.ref
    )

    pending = tmp_path / "pending"
    pending.mkdir()
    shutil.copy2(chat_run / "config.yaml", pending / "config.yaml")
    with pytest.raises(ModelError, match="no final adapter yet"):
        load_run(pending)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy2(chat_run / "adapter" / "adapter_config.json", pickled / "adapter_config.json")
    (pickled / "adapter_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ModelError, match="never loaded"):
        load_run(pickled)
    with pytest.raises(ModelError, match="no such run"):
        load_run(tmp_path / "missing")


def test_the_base_model_is_found_when_its_path_holds_a_token_or_a_name_shaped_like_one(
    chat_run, tiny_model_dir, tmp_path, monkeypatch
):
    """A hub token as a folder of the model's path is never written (config.yaml holds hf_*** there),
    yet the export finds the model; a folder merely shaped like a token is written as it is."""
    from qlora_engine.export.source import resolve_base

    def run_with_model_at(model: Path, name: str) -> Path:
        shutil.copytree(tiny_model_dir, model)
        run = tmp_path / name
        shutil.copytree(chat_run / "adapter", run / "adapter")
        (run / "adapter" / "config.yaml").unlink(missing_ok=True)
        acfg = json.loads((run / "adapter" / "adapter_config.json").read_text())
        acfg["base_model_name_or_path"] = str(model)  # as peft writes it (then scrubbed with the folder)
        scrub.write_text(run / "adapter" / "adapter_config.json", json.dumps(acfg))
        cfg = TrainConfig.load(chat_run / "config.yaml")
        cfg.model.ref = str(model)
        cfg.save(run / "config.yaml")
        return run

    token = "hf_" + "Zq7Secret" * 4
    monkeypatch.setenv("HF_TOKEN", token)
    secret_run = run_with_model_at(tmp_path / token / "model", "secret")
    written = (secret_run / "config.yaml").read_text()
    assert token not in written and f"hf_***{os.sep}model" in written
    assert resolve_base(load_run(secret_run)) == tmp_path / token / "model"  # the known token put back
    monkeypatch.delenv("HF_TOKEN")
    assert resolve_base(load_run(secret_run)) == tmp_path / token / "model"  # the one folder that fits

    looks = "hf_" + "NotASecretJustAName" * 2
    named_run = run_with_model_at(tmp_path / looks / "model", "named")
    assert TrainConfig.load(named_run / "config.yaml").model.ref == str(tmp_path / looks / "model")
    assert resolve_base(load_run(named_run)) == tmp_path / looks / "model"


def test_cli_export_refuses_an_existing_folder_then_replaces_it_with_force(chat_run, tmp_path, capsys):
    from qlora_engine.cli import main

    out = tmp_path / "cli-out"
    assert main(["export", str(chat_run), "--format", "adapter", "--out", str(out)]) == 0
    assert (out / "README.md").is_file()
    assert main(["export", str(chat_run), "--format", "adapter", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "already exists" in err and "--force" in err
    assert main(["export", str(chat_run), "--format", "adapter", "--out", str(out), "--force"]) == 0
    assert main(["export", str(tmp_path / "nope"), "--format", "adapter", "--out", str(tmp_path / "x")]) == 2


def test_exports_carry_the_chat_template_the_run_trained_with(chat_run, tmp_path):
    from transformers import AutoTokenizer

    template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    info = load_run(chat_run)
    info.config = apply_overrides(info.config, [f"data.chat_template={template}"])
    assert info.config.data.chat_template == template
    out = export(info, "adapter", tmp_path / "adapter")
    assert AutoTokenizer.from_pretrained(out).chat_template == template
    # without an override, the tokenizer's own template (the one the data went through) is kept
    plain = export(chat_run, "adapter", tmp_path / "plain")
    assert (
        AutoTokenizer.from_pretrained(plain).chat_template
        == AutoTokenizer.from_pretrained(chat_run / "adapter").chat_template
    )
