"""A run whose offloaded layer inputs would pin more CPU RAM than the machine has is refused
before the model loads (``plan.check_host_ram`` through ``make_plan``).

The pinned bytes are exact: tokens x hidden size x 2 bytes x checkpointed layers. The tests
compute them here from the shape, independently of the budget, and put the machine's
available RAM on either side of the limit.
"""

from __future__ import annotations

import pytest
from tiny import LLAMA3_8B

from qlora_engine import vram
from qlora_engine.budget.units import format_bytes
from qlora_engine.config import TrainConfig, apply_overrides
from qlora_engine.errors import ConfigError
from qlora_engine.plan import HOST_RAM_SHARE, make_plan

GiB = 2**30
CARD = 80 * GiB


def cfg(seq: int, mbs: int = 1, offload: bool = True) -> TrainConfig:
    return apply_overrides(
        TrainConfig(),
        [
            "model.ref=llama-8b",
            "data.path=x.jsonl",
            f"data.max_length={seq}",
            f"train.micro_batch_size={mbs}",
            "train.gradient_checkpointing=true",
            f"train.offload_activations={'true' if offload else 'false'}",
        ],
    )


def pinned(seq: int, mbs: int = 1) -> int:
    """What the offloaded inputs of every layer take: the shape's arithmetic, not the budget's."""
    return seq * mbs * LLAMA3_8B["hidden_size"] * 2 * LLAMA3_8B["num_hidden_layers"]


def plan(c: TrainConfig, host: int | None, *, cuda: bool = True):
    seq = c.data.max_length
    stats = {"max": seq, "p95": seq, "median": seq}
    return make_plan(
        c, n_train=100, data_stats=stats, cuda=cuda, card_bytes=CARD, model_config=LLAMA3_8B, host_ram_bytes=host
    )


SHAPES = [(8192, 1), (32768, 1), (131072, 1), (350000, 1), (500000, 1), (16384, 4), (65536, 2)]


@pytest.mark.parametrize(("seq", "mbs"), SHAPES)
@pytest.mark.parametrize("share", [0.81, 0.9, 1.0, 1.5, 3.0, 10.0, 1000.0])
def test_more_than_the_share_of_the_ram_is_refused_naming_both_sizes(seq, mbs, share):
    need = pinned(seq, mbs)
    host = int(need / share)  # the need is `share` of the available RAM, more than may be pinned
    assert need > HOST_RAM_SHARE * host
    with pytest.raises(ConfigError) as e:
        plan(cfg(seq, mbs), host)
    err = e.value
    assert err.field == "train.offload_activations"
    assert format_bytes(need) in err.what and format_bytes(host) in err.what
    assert "data.max_length" in err.fix and "train.micro_batch_size" in err.fix


@pytest.mark.parametrize(("seq", "mbs"), SHAPES)
@pytest.mark.parametrize("share", [0.79, 0.7, 0.5, 0.1, 0.001])
def test_what_fits_in_the_share_runs(seq, mbs, share):
    host = int(pinned(seq, mbs) / share) + 1
    p = plan(cfg(seq, mbs), host)
    assert p.config.train.offload_activations is True
    assert p.vram_estimate["details"]["host_activation_bytes"] == pinned(seq, mbs)


@pytest.mark.parametrize("seq", [8192, 500000])
def test_no_offloading_no_cpu_run_and_no_reading_pin_nothing(seq):
    tiny_ram = 1 * GiB
    assert plan(cfg(seq, offload=False), tiny_ram).config.train.offload_activations is False
    plan(cfg(seq), tiny_ram, cuda=False)  # on the CPU nothing is offloaded (the trainer ignores it)
    plan(cfg(seq), None)  # not asked: the budget is advice


def test_the_machine_s_available_ram_is_read():
    import psutil

    got = vram.available_host_ram()
    assert 0 < got <= psutil.virtual_memory().total
