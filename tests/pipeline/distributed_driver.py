"""The ``latticequant`` command as torchrun starts it, with one rank made to fail on purpose.

    python -m torch.distributed.run --standalone --nproc-per-node 2 distributed_driver.py \
        RANK BLOCK MODE quantize ARGS...

MODE ``raise`` makes rank RANK raise an error when it reaches block BLOCK, ``kill`` kills it
there with SIGKILL, ``none`` changes nothing. Used by test_distributed.py.
"""

from __future__ import annotations

import os
import signal
import sys

import latticequant.pipeline.run as run
from latticequant.cli import main


def inject(rank: int, block: int, mode: str) -> None:
    original = run._quantize_block

    def failing(layout, index, *args, **kwargs):
        if mode != "none" and int(os.environ.get("RANK", "0")) == rank and index == block:
            if mode == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise ValueError(f"injected failure in block {index}")
        return original(layout, index, *args, **kwargs)

    run._quantize_block = failing


if __name__ == "__main__":
    inject(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
    sys.exit(main(sys.argv[4:]))
