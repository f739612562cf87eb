"""Training across processes: the rank and world read from torchrun's environment, the process group, and the
few collectives the loop needs, each failing with the rank that saw the failure instead of hanging.

torchrun (or `visrec train --nproc N`, which starts torch's own launcher) sets RANK, WORLD_SIZE, LOCAL_RANK,
LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT for each process; with WORLD_SIZE > 1 the loop joins the group:
gloo on the CPU, NCCL on CUDA (or `train.dist_backend`), with `train.dist_timeout` on every collective.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from .errors import VisrecError


class DistributedError(VisrecError):
    """A collective failed: another rank died, hung past the timeout, or the group broke."""


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1
    backend: str | None = None

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def _run(self, what: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (RuntimeError, OSError) as e:  # gloo/NCCL errors: a peer is gone or the timeout passed
            raise DistributedError(
                f"rank {self.rank} of {self.world}: {what} failed ({str(e).splitlines()[0][:200]}): another rank "
                "died, hung past train.dist_timeout, or the process group broke",
                "see the other ranks' output for the first error; resume the run with --resume RUN "
                "(any number of processes)") from None

    def barrier(self) -> None:
        if self.active:
            self._run("a barrier", dist.barrier)

    def mean(self, t: torch.Tensor) -> torch.Tensor:
        """The element-wise mean of `t` over the ranks (every rank gets it)."""
        if not self.active:
            return t
        t = t.clone()
        self._run("an all-reduce", dist.all_reduce, t, op=dist.ReduceOp.SUM)
        return t / self.world

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return t
        t = t.clone()
        self._run("an all-reduce", dist.all_reduce, t, op=dist.ReduceOp.SUM)
        return t

    def any(self, flag: bool, device: torch.device | str = "cpu") -> bool:
        """True on every rank when any rank says True."""
        if not self.active:
            return flag
        return bool(self.sum(torch.tensor(float(flag), device=device)).item() > 0)

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj`, on every rank."""
        if not self.active:
            return obj
        box = [obj]
        self._run("a broadcast", dist.broadcast_object_list, box, src=0)
        return box[0]

    def shard(self, n: int) -> tuple[int, int]:
        """This rank's contiguous share [start, end) of n items: every item in exactly one share, the shares as
        even as possible (the first n % world ranks hold one more)."""
        base, extra = divmod(n, self.world)
        start = self.rank * base + min(self.rank, extra)
        return start, start + base + (1 if self.rank < extra else 0)

    def gather_rows(self, part: torch.Tensor, n: int) -> torch.Tensor:
        """Every rank's `shard(n)` rows of a tensor, concatenated in rank order on every rank: each row once, no
        padding left in the result."""
        if not self.active:
            return part
        sizes = [Dist(r, self.world).shard(n) for r in range(self.world)]
        longest = max(e - s for s, e in sizes)
        padded = part.new_zeros((longest, *part.shape[1:]))
        padded[: len(part)] = part
        out = [torch.empty_like(padded) for _ in range(self.world)]
        self._run("an all-gather", dist.all_gather, out, padded.contiguous())
        return torch.cat([o[: e - s] for o, (s, e) in zip(out, sizes, strict=True)])


def env_world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _attempt_store(rank: int, world: int, timeout_s: float) -> dict[str, Any]:
    """Under torchrun, the group's keys in a store of this attempt's own (`--max-restarts`): restarted processes
    otherwise read the failed attempt's gloo addresses from torchrun's store and never connect."""
    if "TORCHELASTIC_RESTART_COUNT" not in os.environ:
        return {}
    attempt = os.environ["TORCHELASTIC_RESTART_COUNT"]
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"  # torchrun's agent hosts it
    base = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                         is_master=not agent and rank == 0, timeout=timedelta(seconds=timeout_s))
    return {"store": dist.PrefixStore(f"visrec/attempt_{attempt}", base), "rank": rank, "world_size": world}


def init_distributed(backend: str = "auto", device_type: str = "cpu", timeout_s: float = 300.0) -> Dist:
    """The Dist of this process: a single-process one without torchrun, else the joined process group."""
    world = env_world()
    if world <= 1:
        return Dist()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    if backend == "auto":
        backend = "nccl" if device_type == "cuda" else "gloo"
    if backend == "nccl" and device_type != "cuda":
        raise VisrecError("train.dist_backend=nccl needs CUDA devices", "use gloo (or auto) on the CPU")
    if not dist.is_initialized():
        if backend == "nccl":
            torch.cuda.set_device(local)
        try:
            dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s), **_attempt_store(rank, world,
                                                                                                    timeout_s))
        except (RuntimeError, ValueError) as e:
            raise DistributedError(f"rank {rank} of {world} could not join the process group ({backend}): {e}",
                                   "check MASTER_ADDR/MASTER_PORT (torchrun --rdzv-endpoint) and that every node "
                                   "can reach it") from None
    return Dist(rank, world, local, local_world, dist.get_backend())
