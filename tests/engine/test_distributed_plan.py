"""Multi-GPU planning without processes: the strategy, the batch split, the per-GPU budget, the launch lines."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from tiny import LLAMA3_8B

from qlora_engine.budget.estimate import GiB, estimate_from_spec, resolve_spec
from qlora_engine.budget.parallel import per_process
from qlora_engine.cluster import parse_gpus, slurm_script, torchrun_args
from qlora_engine.config import TrainConfig, apply_overrides
from qlora_engine.errors import ConfigError
from qlora_engine.plan import choose_optimizer, choose_strategy, split_batch


def cfg(*overrides: str) -> TrainConfig:
    return apply_overrides(TrainConfig(), ["model.ref=llama-8b", "data.path=x.jsonl", *overrides])


@pytest.mark.parametrize(
    "mbs, ga, world, strategy, want",
    [
        (1, 4, 2, "ddp", (1, 4)),  # two micro-batches each: unchanged
        (1, 4, 3, "ddp", (1, 4)),  # 2, 1, 1: DDP takes uneven shares
        (4, 1, 2, "ddp", (2, 2)),  # one micro-batch of 4 for 2 processes: two of 2
        (1, 4, 3, "fsdp", None),  # FSDP needs equal shares; 4 samples cannot make a multiple of 3
        (2, 3, 2, "fsdp", (1, 6)),  # 6 samples: six micro-batches of one, three per process
        (1, 6, 3, "fsdp", (1, 6)),
        (3, 1, 2, "ddp", (1, 3)),  # three micro-batches of one: 2 and 1
        (1, 1, 2, "ddp", None),  # one sample cannot feed two processes
    ],
)
def test_the_step_batch_is_shared_without_changing(mbs, ga, world, strategy, want):
    c = cfg(f"train.micro_batch_size={mbs}", f"train.gradient_accumulation_steps={ga}", f"train.strategy={strategy}")
    if want is None:
        with pytest.raises(ConfigError) as e:
            split_batch(c, world)
        assert e.value.field == "train.gradient_accumulation_steps"
        return
    out, decision = split_batch(c, world)
    assert (out.train.micro_batch_size, out.train.gradient_accumulation_steps) == want
    assert out.train.micro_batch_size * out.train.gradient_accumulation_steps == mbs * ga
    assert (decision is None) == (want == (mbs, ga))


def test_auto_strategy_follows_the_card():
    spec = resolve_spec(cfg(), LLAMA3_8B)
    c = cfg("data.max_length=1024")
    assert choose_strategy(c, 1, spec, 80 * GiB, None)[0] == "single"
    for card in (80 * GiB, None):  # one process names no GPU: it may be a CPU run
        assert "GPU" not in str(choose_strategy(c, 1, spec, card, None)[1])
    assert choose_strategy(c, 4, spec, 80 * GiB, None)[0] == "ddp"
    chosen, decision = choose_strategy(c, 4, spec, 4 * GiB, None)  # 8B in 4 bit does not fit 4 GiB
    assert chosen == "fsdp" and decision.field == "train.strategy" and "4.0 GiB" in decision.reason
    assert choose_strategy(cfg("train.strategy=fsdp"), 2, spec, 80 * GiB, None) == ("fsdp", None)
    with pytest.raises(ConfigError) as e:
        choose_strategy(cfg("train.strategy=single"), 2, spec, 80 * GiB, None)
    assert e.value.field == "train.strategy"


def test_fsdp_takes_torch_adamw():
    out, decision = choose_optimizer(cfg("train.strategy=fsdp"))
    assert out.optim.optimizer == "adamw" and decision.requested == "paged_adamw_8bit"
    assert choose_optimizer(cfg("train.strategy=ddp"))[1] is None


def test_per_gpu_budget_by_strategy():
    c = cfg("data.max_length=1024", "train.gradient_checkpointing=true")
    one = estimate_from_spec(c, resolve_spec(c, LLAMA3_8B))
    ddp = per_process(one, "ddp", 4, 32)
    fsdp2, fsdp8 = per_process(one, "fsdp", 2, 32), per_process(one, "fsdp", 8, 32)
    assert ddp.total > one.total  # the whole run plus DDP's buckets
    assert ddp.components["ddp_buckets"] == one.components["lora_grads"]
    w = one.components["quantized_weights"]
    assert fsdp2.components["quantized_weights"] == -(-w // 2)
    assert one.total > fsdp2.total > fsdp8.total
    # what no sharding removes: activations, logits, the CUDA context
    for name in ("activations", "logits_loss", "cuda_context"):
        assert fsdp8.components[name] == one.components[name]
    assert per_process(one, "single", 1) is one


@pytest.mark.parametrize("spec, want", [("4", (4, None)), ("0,2", (2, "0,2")), ("3,", (1, "3"))])
def test_gpus_argument(spec, want):
    assert parse_gpus(spec) == want


@pytest.mark.parametrize("spec", ["0", "-1", "a", "1,1", ","])
def test_gpus_argument_refused(spec):
    with pytest.raises(ConfigError):
        parse_gpus(spec)


def test_slurm_script_is_valid_bash_with_a_rendezvous(tmp_path):
    config = tmp_path / "run.yaml"
    cfg("output.dir=runs/x").save(config)
    text = slurm_script(config, nodes=2, gpus_per_node=8, partition="gpu")
    assert "#SBATCH --nodes=2" in text and "#SBATCH --gpus-per-node=8" in text and "#SBATCH --partition=gpu" in text
    assert '"--rdzv-endpoint=$HEAD:29500"' in text and '"--nnodes=$SLURM_NNODES"' in text
    assert "--nproc-per-node=8" in text and "--rdzv-backend=c10d" in text and "#SBATCH --signal=TERM@300" in text
    assert str(config) in text and str(tmp_path / "runs" / "x" / "checkpoints") in text
    if shutil.which("bash"):
        script = tmp_path / "train.sbatch"
        script.write_text(text)
        assert subprocess.run(["bash", "-n", str(script)]).returncode == 0


def test_torchrun_lines():
    assert torchrun_args(2)[0] == "--standalone"
    multi = torchrun_args(8, nnodes="2", rdzv_endpoint="node1:29500", rdzv_id="r")
    assert "--nnodes=2" in multi and "--rdzv-endpoint=node1:29500" in multi and "--standalone" not in multi
