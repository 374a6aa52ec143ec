"""One quantization run across processes with torch.distributed (gloo on CPUs, NCCL on GPUs).

Started by ``torchrun --nproc-per-node N -m latticequant quantize ...`` (or any launcher that sets
``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``), every rank runs the same
pipeline on its contiguous share of the calibration windows:

- each rank runs its windows through every block; a layer group's Hessian is the sum of the
  ranks' partial sums, exchanged as subtrees of the fixed summation tree of
  :class:`~latticequant.core.hessian.HessianAccumulator`, so it is the same float for float as
  one process's, and so are the codes;
- the group's work is shared out by a greedy balance of its cost (:func:`assign_owners`): the
  fixed row blocks of every layer of a row-separable method
  (:func:`~latticequant.methods.registry.row_chunks`), or whole layers for the others; the
  factor of each Hessian the row blocks read is made by all ranks together, panel by panel
  (:func:`~latticequant.core.triangular.cholesky_lower_` with the world as its team); each
  rank sends what it solved to every rank, and all ranks continue with the same quantized
  block;
- rank 0 alone writes the run state and the checkpoint (it gathers the block outputs).

Every exchange polls the rendezvous store while it waits: a rank that fails posts its one-line
error there (:meth:`World.abort`), and every other rank stops with that line instead of
waiting for a peer that will never come.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import timedelta

import torch

from latticequant.core.hessian import HessianAccumulator

log = logging.getLogger(__name__)

__all__ = ["RankFailedError", "World", "assign_owners", "solve_cost", "shard_range"]

ERROR_KEY = "latticequant/error"
POLL_S = 0.05  # how often a waiting rank looks for another rank's error
ACK_WAIT_S = 10.0  # how long a failing rank waits for the others to have read its error
TIMEOUT = timedelta(hours=6)  # one block's forwards and solves on the slowest rank fit in this


class RankFailedError(RuntimeError):
    """Another rank failed; the message is that rank's own one-line error."""


def shard_range(n_windows: int, rank: int, size: int) -> range:
    """Rank ``rank``'s contiguous share of ``n_windows`` (sizes differ by at most one)."""
    if n_windows < size:
        raise ValueError(
            f"{n_windows} calibration windows cannot be shared by {size} ranks; pass "
            f"--nsamples {size} or more, or start fewer ranks"
        )
    return range(rank * n_windows // size, (rank + 1) * n_windows // size)


def solve_cost(d_out: int, d_in: int) -> float:
    """Relative cost of one layer's solve: the factorisation plus the back-substitution."""
    return d_in**3 / 3 + d_out * d_in**2


def assign_owners(
    costs: dict[str, float], size: int, loads: list[float] | None = None
) -> dict[str, int]:
    """Greedy balance of one group's solves: layer name -> owning rank.

    The largest solve goes first, each to the rank with the least work in this group (the
    group's layers run in parallel); ``loads``, the ranks' work so far in the run (updated in
    place), breaks ties, and then the lowest rank: every rank computes the same assignment.
    """
    total = loads if loads is not None else [0.0] * size
    group = [0.0] * size
    order = list(costs)
    owners = {}
    for name in sorted(order, key=lambda n: (-costs[n], order.index(n))):
        rank = min(range(size), key=lambda r: (group[r], total[r], r))
        owners[name] = rank
        group[rank] += costs[name]
        total[rank] += costs[name]
    return owners


@dataclass
class World:
    """The ranks of one run; a single process is a world of size one and exchanges nothing.

    ``timings`` adds up the seconds this rank spent in each kind of exchange (waiting
    included), for the benchmark's split of the wall time.
    """

    rank: int = 0
    size: int = 1
    store: object | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    timings: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    loads: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.loads:
            self.loads = [0.0] * self.size

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @classmethod
    def from_env(cls, device: str | torch.device = "cpu") -> World:
        """The world the launcher describes in the environment; size one when it describes none.

        The process group uses NCCL when the blocks run on CUDA, gloo otherwise.
        """
        size = int(os.environ.get("WORLD_SIZE", "1") or 1)
        if size <= 1:
            return cls()
        import torch.distributed as dist

        host = os.environ.get("MASTER_ADDR", "127.0.0.1")
        try:
            rank, port = int(os.environ["RANK"]), int(os.environ["MASTER_PORT"])
        except (KeyError, ValueError):
            raise ValueError(
                f"WORLD_SIZE={size} is set but RANK or MASTER_PORT is missing or not a number; "
                "start the run with torchrun"
            ) from None
        device = torch.device(device)
        # under torchrun the agent hosts the store; otherwise rank 0 does
        agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
        store = dist.TCPStore(
            host, port, size, is_master=(rank == 0 and not agent), timeout=TIMEOUT
        )
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device.index if device.index is not None else rank)
            device = torch.device("cuda", torch.cuda.current_device())
        dist.init_process_group(
            backend,
            store=dist.PrefixStore("latticequant/pg", store),
            rank=rank,
            world_size=size,
            timeout=TIMEOUT,
        )
        log.info("rank %d of %d (%s)", rank, size, backend)
        return cls(rank, size, dist.PrefixStore("latticequant", store), device)

    def shard(self, n_windows: int) -> range:
        """This rank's windows."""
        return shard_range(n_windows, self.rank, self.size)

    # -- failure -------------------------------------------------------------------------

    def abort(self, message: str) -> None:
        """Tell the other ranks that this one failed, with its one-line error."""
        if not self.distributed or self.store is None:
            return
        try:
            if self.store.add("failed", 1) != 1:  # the first failure is the one reported
                return
            self.store.set("error", f"rank {self.rank}: {message}")
            # a launcher stops the other ranks once this one exits: give them the time to
            # read the error first (those in a long computation will be stopped silently)
            deadline = time.monotonic() + ACK_WAIT_S
            while self.store.add("seen", 0) < self.size - 1 and time.monotonic() < deadline:
                time.sleep(0.01)
        except Exception:  # the store may be gone with the launcher; nothing more to tell
            log.debug("could not post the error", exc_info=True)

    @contextlib.contextmanager
    def failing_together(self) -> Iterator[None]:
        """Any error raised inside is posted for the other ranks (then raised here as usual)."""
        try:
            yield
        except RankFailedError:
            raise
        except BaseException as exc:
            lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
            self.abort(lines[0] if lines else type(exc).__name__)
            raise

    def _posted_error(self) -> str | None:
        if self.store is None:
            return None
        try:
            if self.store.check(["error"]):
                error = self.store.get("error").decode()
                self.store.add("seen", 1)
                return error
        except Exception:
            return "the rendezvous store is gone (another rank or the launcher stopped)"
        return None

    def _wait(self, work) -> None:
        """Wait for an asynchronous collective, watching for another rank's error."""
        last = 0.0
        while not work.is_completed():
            now = time.monotonic()
            if now - last >= POLL_S:
                last = now
                error = self._posted_error()
                if error is not None:
                    raise RankFailedError(error)
            time.sleep(0.001)
        try:
            work.wait()
        except RuntimeError:  # a peer died without a word (killed)
            error = self._posted_error()
            raise RankFailedError(
                error
                or "lost contact with another rank, which stopped without an error "
                "(killed?); rerun the same command to resume"
            ) from None

    # -- exchanges of Python objects -----------------------------------------------------

    def _bytes(self, obj) -> torch.Tensor:
        data = bytearray(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))
        return torch.frombuffer(data, dtype=torch.uint8).to(self.device)

    def _lengths(self, buf: torch.Tensor) -> list[int]:
        import torch.distributed as dist

        n = torch.tensor([buf.numel()], dtype=torch.int64, device=self.device)
        sizes = [torch.zeros_like(n) for _ in range(self.size)]
        self._wait(dist.all_gather(sizes, n, async_op=True))
        return [int(s) for s in sizes]

    @staticmethod
    def _unwrap(items: list) -> list:
        """The payloads, or the first rank's error raised on every rank alike."""
        for rank, (status, payload) in enumerate(items):
            if status == "error":
                raise RankFailedError(f"rank {rank}: {payload}")
        return [payload for _, payload in items]

    def all_gather(self, obj, kind: str, error: str | None = None) -> list:
        """Every rank's ``obj``, in rank order, on every rank; ``error`` instead of ``obj``
        makes every rank raise :class:`RankFailedError` with it."""
        item = ("error", error) if error is not None else ("ok", obj)
        if not self.distributed:
            return self._unwrap([item])
        import torch.distributed as dist

        t0 = time.perf_counter()
        buf = self._bytes(item)
        lengths = self._lengths(buf)
        padded = torch.zeros(max(lengths), dtype=torch.uint8, device=self.device)
        padded[: buf.numel()] = buf
        bufs = [torch.empty_like(padded) for _ in range(self.size)]
        self._wait(dist.all_gather(bufs, padded, async_op=True))
        items = [pickle.loads(b[:n].cpu().numpy().tobytes()) for b, n in zip(bufs, lengths)]
        self.timings[kind] += time.perf_counter() - t0
        return self._unwrap(items)

    def gather_rows(self, t: torch.Tensor, rows: Sequence[int], kind: str) -> torch.Tensor | None:
        """Every rank's ``t`` (``rows[r]`` rows on rank r, the rest of the shape and the dtype
        alike) concatenated in rank order on rank 0, None elsewhere: a plain tensor
        collective, without the copies of pickling."""
        if not self.distributed:
            return t
        import torch.distributed as dist

        t0 = time.perf_counter()
        padded = torch.zeros((max(rows), *t.shape[1:]), dtype=t.dtype, device=self.device)
        padded[: t.shape[0]] = t
        bufs = [torch.empty_like(padded) for _ in rows] if self.rank == 0 else None
        self._wait(dist.gather(padded, bufs, dst=0, async_op=True))
        out = None if bufs is None else torch.cat([b[:n].cpu() for b, n in zip(bufs, rows)])
        self.timings[kind] += time.perf_counter() - t0
        return out

    def broadcast(self, obj, kind: str, src: int = 0, error: str | None = None):
        """Rank ``src``'s ``obj`` on every rank (its ``error`` raised on every rank)."""
        item = ("error", error) if error is not None else ("ok", obj)
        if not self.distributed:
            return self._unwrap([item])[0]
        import torch.distributed as dist

        t0 = time.perf_counter()
        buf = self._bytes(item if self.rank == src else None)
        n = torch.tensor([buf.numel()], dtype=torch.int64, device=self.device)
        self._wait(dist.broadcast(n, src, async_op=True))
        data = (
            buf if self.rank == src else torch.empty(int(n), dtype=torch.uint8, device=self.device)
        )
        self._wait(dist.broadcast(data, src, async_op=True))
        status, payload = pickle.loads(data.cpu().numpy().tobytes())
        self.timings[kind] += time.perf_counter() - t0
        if status == "error":
            raise RankFailedError(f"rank {src}: {payload}")
        return payload

    def barrier(self, error: str | None = None) -> None:
        """Wait for every rank; any rank's ``error`` is raised on all of them."""
        self.all_gather(None, "barrier", error)

    # -- the pipeline's exchanges --------------------------------------------------------

    def reduce_hessian(self, acc: HessianAccumulator) -> HessianAccumulator:
        """The accumulator of every rank's windows, the same on every rank (and the same
        float for float as one process's)."""
        if not self.distributed:
            return acc
        nodes = [
            type(node)(node.start, node.size, node.n_tokens, node.S.cpu()) for node in acc.nodes()
        ]
        parts = self.all_gather(nodes, "reduce")
        return type(acc).from_nodes(parts, acc.d_in, acc.dtype, acc.device)

    def close(self) -> None:
        """Leave the process group (after a failure, just exit: the peers may be gone)."""
        if not self.distributed:
            return
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
