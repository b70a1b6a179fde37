"""Point-to-point messages between the ranks of a process group, with a timeout on every wait.

``Link`` posts rounds of ``isend``/``irecv`` (torch.distributed's own: NCCL on GPUs, gloo on
the CPU, which has no all_to_all) and counts the bytes it handed to each. A wait that a dead or stuck peer never
completes raises ``PeerError`` naming both ranks, the phase and the timeout, instead of
hanging (gloo reports a closed connection at once, a silent peer after the timeout).
"""
from __future__ import annotations

import dataclasses
import datetime

import torch

__all__ = ["CommStats", "Link", "PeerError", "Round", "group_timeout"]


class PeerError(RuntimeError):
    """A peer rank did not answer within the timeout (it died, or is stuck elsewhere)."""


@dataclasses.dataclass
class CommStats:
    """Bytes this rank handed to ``isend`` / had filled by ``irecv``, per direction, and the
    messages it sent."""

    forward_bytes_sent: int = 0
    forward_bytes_received: int = 0
    backward_bytes_sent: int = 0
    backward_bytes_received: int = 0
    messages_sent: int = 0
    ids_bytes_sent: int = 0       # group ids / padding, all-gathered once per call

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(eq=False)
class Round:
    """Messages posted together (one ``batch_isend_irecv``): ``buffers[i]`` is the i-th
    receive's buffer, filled once ``Link.wait`` returns."""

    works: list
    ops: list          # (peer, "send to" | "receive from") per work
    buffers: list
    phase: str
    waited: set = dataclasses.field(default_factory=set)   # works already waited for (gloo waits once)


@dataclasses.dataclass(eq=False)
class Link:
    """This rank's messages in ``group`` for one attention (``name`` goes into errors).

    Every exchange is posted as one ``torch.distributed.batch_isend_irecv`` (a round), which
    NCCL needs when two ranks send to each other at once and gloo runs as separate messages;
    between two ranks, messages are matched in the order they are posted."""

    group: object
    rank: int
    timeout: datetime.timedelta
    name: str
    stats: CommStats = dataclasses.field(default_factory=CommStats)

    def post(self, sends, recvs, phase: str) -> Round:
        """Post ``sends`` [(peer, tensor)] and ``recvs`` [(peer, buffer)] of ``phase``
        ("forward" | "backward")."""
        import torch.distributed as dist

        ops, what, buffers = [], [], []
        for peer, buffer in recvs:
            ops.append(dist.P2POp(dist.irecv, buffer, group=self.group, group_peer=peer))
            what.append((peer, "receive from"))
            buffers.append(buffer)
            self._count(phase, "received", buffer)
        for peer, tensor in sends:
            tensor = tensor.contiguous()
            ops.append(dist.P2POp(dist.isend, tensor, group=self.group, group_peer=peer))
            what.append((peer, "send to"))
            self.stats.messages_sent += 1
            self._count(phase, "sent", tensor)
        works = dist.batch_isend_irecv(ops) if ops else []
        return Round(works, what, buffers, phase)

    def _count(self, phase: str, way: str, t: torch.Tensor) -> None:
        name = f"{phase}_bytes_{way}"
        setattr(self.stats, name, getattr(self.stats, name) + t.numel() * t.element_size())

    def all_gather(self, tensor: torch.Tensor, phase: str) -> list[torch.Tensor]:
        """Every rank's ``tensor`` (one shape on all ranks), by rank; counted as ``ids_bytes_sent``."""
        import torch.distributed as dist

        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(self.group))]
        work = dist.all_gather(parts, tensor.contiguous(), group=self.group, async_op=True)
        self.stats.ids_bytes_sent += tensor.numel() * tensor.element_size()
        self.wait(Round([work], [("all", "gather group ids with")], [], phase))
        return parts

    def wait(self, round_: Round) -> list[torch.Tensor]:
        """Wait for every message of a round; the filled receive buffers, in posting order."""
        for i in range(len(round_.works)):
            self._wait_work(round_, i)
        return round_.buffers

    def received(self, round_: Round, i: int) -> torch.Tensor:
        """Wait for the i-th receive of a round only (receives are posted first); its buffer.
        Where the backend returns one work for the whole round (NCCL coalesces a batch),
        that is the whole round."""
        if len(round_.works) == len(round_.ops):
            self._wait_work(round_, i)
        else:
            self.wait(round_)
        return round_.buffers[i]

    def _wait_work(self, round_: Round, i: int) -> None:
        if i in round_.waited:
            return
        round_.waited.add(i)
        peer, what = round_.ops[i] if len(round_.works) == len(round_.ops) else ("all", "exchange with")
        try:
            round_.works[i].wait(self.timeout)
        except Exception as e:  # gloo: a timeout or "connection closed by peer"
            first = str(e).splitlines()[0] if str(e) else ""
            raise PeerError(
                f"sparseforge.distributed: rank {self.rank} could not {what} {_peer(peer)} in the "
                f"{round_.phase} K/V exchange of {self.name} within {self.timeout.total_seconds():g} s: the "
                f"peer process died or is stuck ({type(e).__name__}: {first})") from e


def _peer(peer) -> str:
    return "the other ranks" if peer == "all" else f"rank {peer}"


def group_timeout(group) -> datetime.timedelta:
    """The timeout ``group`` was created with (``init_process_group(timeout=)``), where the
    backend exposes it; else torch's default for the backend."""
    for device in ("cpu", "cuda"):
        try:
            t = group._get_backend(torch.device(device)).options._timeout  # noqa: SLF001
        except Exception:  # noqa: BLE001 - no such backend on this group, or no options
            continue
        if isinstance(t, datetime.timedelta) and t.total_seconds() > 0:
            return t
    try:
        from torch.distributed.distributed_c10d import _get_default_timeout, _world

        return _get_default_timeout(_world.pg_map.get(group, ("gloo",))[0])
    except Exception:  # noqa: BLE001  # pragma: no cover
        return datetime.timedelta(minutes=30)
