"""The real ``qlora-engine train``, except that a step runs out of GPU memory: for the app's tests.

``python oom_engine.py STEP train CONFIG --events - ...``: the trainer raises
``torch.cuda.OutOfMemoryError`` when it fetches a micro-batch after STEP optimizer steps,
where a real out-of-memory error would surface on a card. Everything else is the engine's
own code: its out-of-memory handling frees the memory, asks the budget for fixes, writes
the ``run_failed`` event (with the fixes and the last checkpoint) and exits with code 3.
A CPU cannot run out of GPU memory, so this is how the tests get a real failure.
"""

from __future__ import annotations

import sys


def main() -> int:
    import torch

    from qlora_engine import cli
    from qlora_engine.train import Trainer

    at_step = int(sys.argv[1])
    real = Trainer.micro_batch

    def micro_batch(self: Trainer, k: int) -> dict[str, torch.Tensor]:
        if self.step == at_step:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (raised by the test)")
        return real(self, k)

    Trainer.micro_batch = micro_batch
    return cli.main(sys.argv[2:])


if __name__ == "__main__":
    raise SystemExit(main())
