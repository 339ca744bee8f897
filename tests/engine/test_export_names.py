"""What an export is called and what its card says, checked the way each consumer reads the files.

Every export is named for the base model and the run (never just "run"), lands beside the run
folder unless told otherwise, and its README.md lists every file it ships with how to use it.
The adapter loads with peft, the merged model with transformers, the GGUF files with the
``gguf`` reader; Modelfiles follow Ollama's syntax and every path in them is relative and
points at a file of the export.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import gguf
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_export_support import PROBE, trained_chat_run  # noqa: E402

from qlora_engine.export import export, load_run  # noqa: E402
from qlora_engine.export.source import base_model_name, default_export_dir, export_name  # noqa: E402

OLLAMA_INSTRUCTIONS = {"FROM", "ADAPTER", "TEMPLATE", "PARAMETER", "SYSTEM", "LICENSE", "MESSAGE", "REQUIRES"}


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory, tiny_model_dir) -> Path:
    return trained_chat_run(tmp_path_factory, tiny_model_dir)


def card_files(folder: Path) -> dict[str, str]:
    """The files the export's README.md lists under '## Files', with what it says of each."""
    text = (folder / "README.md").read_text(encoding="utf-8")
    section = text.split("## Files", 1)[1].split("\n## ", 1)[0]
    return dict(re.findall(r"^- `([^`]+)`: (.+)$", section, re.MULTILINE))


def assert_card_lists_every_file(folder: Path) -> None:
    listed = card_files(folder)
    assert set(listed) == {p.name for p in folder.iterdir() if p.is_file()}
    assert all(len(what) > 10 and what != "a file of this export" for what in listed.values()), listed


def parse_modelfile(text: str) -> list[tuple[str, str]]:
    """(instruction, argument) pairs as Ollama reads a Modelfile: '#' comments, one instruction a line,
    triple-quoted arguments may span lines."""
    out, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        line = lines[i].strip()
        i += 1
        if not line or line.startswith("#"):
            continue
        instruction, _, arg = line.partition(" ")
        assert instruction.upper() in OLLAMA_INSTRUCTIONS, line
        if arg.startswith('"""') and not (len(arg) > 3 and arg.endswith('"""')):
            while not arg.endswith('"""'):
                arg += "\n" + lines[i]
                i += 1
        out.append((instruction.upper(), arg))
    return out


def check_modelfile(folder: Path, file_name: str) -> list[tuple[str, str]]:
    text = (folder / file_name).read_text(encoding="utf-8")
    header = next(line for line in text.splitlines() if "ollama create" in line)
    create = shlex.split(header.split(":", 1)[1])
    assert create[:2] == ["ollama", "create"] and create[3:] == ["-f", file_name]
    pairs = parse_modelfile(text)
    for instruction, arg in pairs:
        if instruction in ("FROM", "ADAPTER"):
            assert arg.startswith("./") and "/" not in arg[2:], f"{file_name}: {instruction} {arg} is not relative"
            assert (folder / arg[2:]).is_file(), f"{file_name}: {arg} is not in the export"
    return pairs


def test_names_come_from_the_base_model_and_the_run():
    assert base_model_name("HuggingFaceTB/SmolLM2-135M-Instruct") == "smollm2-135m-instruct"
    assert base_model_name("/cache/demo/SmolLM2-135M-Instruct.Q4_1.gguf") == "smollm2-135m-instruct"
    assert base_model_name("models/Meta-Llama-3-8B-Instruct-Q4_K_M.gguf") == "meta-llama-3-8b-instruct"
    assert base_model_name("/data/models/llama-3-8b/") == "llama-3-8b"
    assert export_name("/cache/demo/SmolLM2-135M-Instruct.Q4_1.gguf", "pirate") == "smollm2-135m-instruct-pirate"
    assert export_name("org/Llama", "llama-chat") == "llama-chat"  # no repeated base name
    assert export_name("org/Llama", "My Run!") == "llama-my-run"


def test_adapter_export_default_folder_card_and_loading_with_peft(chat_run, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    info = load_run(chat_run)
    name = info.export_name
    assert name == f"{base_model_name(str(tiny_model_dir))}-run" and name != "run"
    out = subprocess.run(
        [sys.executable, "-m", "qlora_engine", "export", str(chat_run), "--format", "adapter"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    folder = chat_run.parent / f"{name}-lora"
    assert folder == default_export_dir(info, "adapter") and folder.is_dir()
    assert_card_lists_every_file(folder)
    card = (folder / "README.md").read_text()
    assert card.splitlines()[card.splitlines().index("---", 1) + 2] == f"# {name}: LoRA adapter"
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(folder))
    AutoTokenizer.from_pretrained(folder)
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor(PROBE)).logits).all()


def test_run_adapter_readme_is_our_card_not_peft_template(chat_run):
    """The run's own adapter/ (what `PeftModel.from_pretrained(run/adapter)` users open) carries a filled card."""
    from qlora_engine.export.adapter import write_run_adapter_card

    write_run_adapter_card(chat_run)  # what `qlora-engine train` and the quickstart do when a run finishes
    text = (chat_run / "adapter" / "README.md").read_text()
    assert "[More Information Needed]" not in text  # peft's template
    info = load_run(chat_run)
    assert f"`{info.config.model.ref}`" in text and str(info.config.data.path) in text
    assert (
        f"optimizer steps: {info.facts.steps}" in text and f"final training loss: {info.facts.final_loss:.4f}" in text
    )
    assert "PeftModel.from_pretrained" in text
    assert_card_lists_every_file(chat_run / "adapter")


def test_merged_export_card_lists_every_file_and_loads_with_transformers(chat_run, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = export(chat_run, "merged", tmp_path / "merged")
    assert_card_lists_every_file(folder)
    AutoModelForCausalLM.from_pretrained(folder)
    AutoTokenizer.from_pretrained(folder)


def test_gguf_export_files_modelfile_and_card(chat_run, tmp_path):
    info = load_run(chat_run)
    name = info.export_name
    folder = export(chat_run, "gguf", tmp_path / "gguf")
    assert sorted(p.name for p in folder.glob("*.gguf")) == [
        f"{name}-f16.gguf",
        f"{name}-lora.gguf",
        f"{name}-q8_0.gguf",
    ]
    for p in folder.glob("*.gguf"):
        r = gguf.GGUFReader(str(p))
        assert r.fields["general.name"].contents() == name
    pairs = check_modelfile(folder, "Modelfile")
    assert ("FROM", f"./{name}-q8_0.gguf") in pairs
    assert_card_lists_every_file(folder)
    assert f"ollama create {name} -f Modelfile" in (folder / "README.md").read_text()


@pytest.mark.slow
def test_gguf_export_of_a_gguf_base_ships_the_base_beside_a_relative_modelfile_lora(
    smollm2_gguf, smollm2_dir, tmp_path
):
    """The demo's case: the run's base is a .gguf file; Modelfile.lora applies the adapter to it, by relative paths."""
    from test_export_gguf import fake_run
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    run_dir, _ = fake_run(tmp_path, base, tok, ["q_proj", "v_proj"], base_ref=str(smollm2_gguf))
    folder = export(run_dir, "gguf", tmp_path / "gguf", gguf_types=["q8_0"])
    name = load_run(run_dir).export_name
    assert name == "smollm2-135m-instruct-run"
    pairs = check_modelfile(folder, "Modelfile.lora")
    assert ("FROM", f"./{smollm2_gguf.name}") in pairs and ("ADAPTER", f"./{name}-lora.gguf") in pairs
    shipped = folder / smollm2_gguf.name
    assert shipped.stat().st_size == smollm2_gguf.stat().st_size
    assert gguf.GGUFReader(str(shipped)).fields["general.architecture"].contents() == "llama"
    check_modelfile(folder, "Modelfile")
    assert_card_lists_every_file(folder)
    assert f"ollama create {name}-lora -f Modelfile.lora" in (folder / "README.md").read_text()
