"""How one fragment of the synchronous exchange goes over the network: in the parameters' dtype
(or bfloat16/float16) as an all-reduce, or quantized (8, 4 or 2 bits a value) with error feedback
as an all-to-all and an all-gather. Each wire prepares its buffers and steps once, then runs in three phases that the
replicated center schedules:

``start``    the rule's send steps and the first collective, launched, not waited for;
``advance``  (quantized only) the first collective completed, the owner's sum re-quantized and the
             second collective launched;
``finish``   every collective completed (waiting at most ``exchange_timeout`` where the host
             waits), then the apply steps, which read the exchange's verdict on the device.

Nothing is applied before ``finish``: a collective that fails leaves parameters, center and
residuals as they were.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.distributed as dist

from .. import _dist
from .._native import native, tensor_ref
from ..algorithms import Piece, SyncRule, Verdict
from ..flat_params import ALIGN_ELEMENTS, bucket_ranges
from ..settings import QUANT_BLOCK
from ..stats import BAD_RANKS, ME_BAD, OVERFLOW, STATUS_LEN, ring_allreduce_bytes
from . import quantize_torch
from .fragments import FragmentPlan
from .program import Program

HEADER = ALIGN_ELEMENTS  # float wire elements before the data: the flag, padded for alignment


def torch_step(function: Callable[..., None], *args: Any) -> Callable[[], None]:
    def step() -> None:
        with torch.no_grad():
            function(*args)
    return step


class Wire:
    """One fragment's exchange (a subclass builds its send's kernels as ``_prepare``). ``status`` holds, per device, the vector its steps fill
    (ME_BAD, BAD_RANKS, OVERFLOW); ``bytes_sent`` is what this rank puts on the network."""

    bytes_sent: int = 0
    status: dict[torch.device, torch.Tensor]

    def start(self, comm: _dist.Comm, capturing: bool,
              wait: Callable[[Any], None] | None = None) -> list[Any]:
        """Sends: the kernels, then the collectives (their works; none while capturing).
        ``wait`` waits for a collective that must finish before the send goes on."""
        raise NotImplementedError

    def gather(self, comm: _dist.Comm, capturing: bool, wait: Callable[[Any], None]) -> list[Any]:
        """The second phase, where a wire has one (the quantized wire: the owners reduce their
        chunks and all-gather them): its works. Not the center's ``advance``."""
        return []

    def finish(self) -> None:
        raise NotImplementedError

    def local_pass(self) -> None:
        """The wire's own kernels with its collectives left out (the send's, then the
        apply's): what its exchange costs beyond the network, for benchmarks. It moves the
        parameters as an exchange would with the buffers as they stand; time with it only."""
        self._prepare()
        self.finish()


def _status_vectors(plan: FragmentPlan) -> dict[torch.device, torch.Tensor]:
    status: dict[torch.device, torch.Tensor] = {}
    for p in plan.pieces:
        status.setdefault(p.group.device, torch.zeros(STATUS_LEN, device=p.group.device))
    return status


def _verdict(header: torch.Tensor, status: torch.Tensor, policy: int, world: int) -> Verdict:
    return Verdict(header, status[ME_BAD:ME_BAD + 1], policy, world,
                   status[BAD_RANKS:BAD_RANKS + 1], status[OVERFLOW:OVERFLOW + 1])


class FloatWire(Wire):
    """``d`` in ``comm_dtype`` (default: the parameters'), a header element carrying the
    non-finite flag in the first bucket, one all-reduce per bucket."""

    def __init__(self, plan: FragmentPlan, rule: SyncRule, comm: _dist.Comm, comm_dtype: torch.dtype | None,
                 bucket_bytes: int, policy: int, delay: bool, torch_path: bool,
                 verdict_groups: list[Any] = ()) -> None:
        self.status = _status_vectors(plan)
        self._prepare, self._apply = Program(), Program()
        # DTensor parameters: the flag is shared (max) with the replica's other ranks between
        # the sends and the publish step, so every shard of a replica publishes the same flag.
        self._verdict_groups = list(verdict_groups)
        self._publish = Program() if self._verdict_groups else self._prepare
        self._flags = [s[ME_BAD:ME_BAD + 1] for s in self.status.values()]
        self._flag_works: list[Any] = []
        self.buckets: list[torch.Tensor] = []
        for device, status in self.status.items():
            self._prepare.add(device, native.prepare.zero(tensor_ref("status", status)))
        sends, publishes = [], []
        payload = 0
        self.buffers: list[tuple[torch.Tensor, torch.Tensor | None]] = []  # (wire, keep) per piece
        for piece in plan.pieces:
            device = piece.group.device
            status = self.status[device]
            wire = torch.zeros(HEADER + piece.end - piece.start, dtype=comm_dtype or piece.group.dtype,
                               device=device)
            data, header = wire[HEADER:], wire[:1]
            keep = torch.zeros_like(data) if delay else None
            self.buffers.append((wire, keep))
            me_bad = status[ME_BAD:ME_BAD + 1]
            # One send per segment of the piece (per local shard of DTensor parameters; the
            # whole piece otherwise), each writing its slice of the one wire.
            for seg, lo, hi in _segments(piece, 0, piece.end - piece.start):
                sends.append((device, _send(rule, seg, data[lo:hi], me_bad, _cut(keep, lo, hi),
                                            torch_path)))
            publishes.append((device, native.prepare.publish_flag(
                tensor_ref("wire", data), tensor_ref("header", header), tensor_ref("me_bad", me_bad))))
            verdict = _verdict(header, status, policy, comm.world_size)
            # Buckets cover the header and the data; each applies the data it carries.
            for s, e in bucket_ranges(wire.numel(), bucket_bytes // wire.element_size()):
                self.buckets.append(wire[s:e])
                for seg, lo, hi in _segments(piece, max(s, HEADER) - HEADER, e - HEADER):
                    self._apply.add(device, _apply(rule, seg, data[lo:hi], verdict,
                                                   _cut(keep, lo, hi), torch_path))
            payload += wire.nbytes
        for device, step in sends:
            self._prepare.add(device, step)
        for device, step in publishes:
            self._publish.add(device, step)
        self.bytes_sent = ring_allreduce_bytes(payload, comm.world_size) if comm.distributed else 0
        self.bytes_sent += sum(ring_allreduce_bytes(4 * len(self._flags), dist.get_world_size(g))
                               for g in self._verdict_groups)

    def start(self, comm, capturing, wait=None):
        self._prepare()
        if self._verdict_groups:
            self._share_verdict(capturing, wait)
            self._publish()
        if not comm.distributed:
            return []
        if capturing:  # captured into the graph with the kernels: no work handles
            for w in self.buckets:
                comm.all_reduce(w)
            return []
        return [comm.all_reduce(w, async_op=True) for w in self.buckets]

    def finish(self):
        self._apply()

    def _share_verdict(self, capturing: bool, wait: Callable[[Any], None] | None) -> None:
        """A one-element all-reduce (max) of the flag over each group connecting this replica's
        ranks: with NCCL the stream waits for it, with Gloo the host does."""
        works = []
        for group in self._verdict_groups:
            for flag in self._flags:
                if capturing:
                    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
                    continue
                work = dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group, async_op=True)
                works.append(work)
                (wait or _plain_wait)(work)
        self._flag_works = works  # kept until the next exchange (see ReplicatedCenter._works)


def _plain_wait(work: Any) -> None:
    work.wait()


class QuantizedWire(Wire):
    """Block-scaled levels of ``bits`` (8, 4 or 2) with error feedback (see csrc/quantize.h):
    each piece's ``contribution + residual`` quantized into one record per owner rank; an
    all-to-all brings each owner its chunk from every rank; the owner sums them in float32 with
    its own residual, re-quantizes, and an all-gather brings every rank every owner's record, so
    all apply the same bytes.

    Any rule rides it: the rule writes its contribution (its float send) into a float32 buffer,
    the wire quantizes, reduces and de-quantizes it, and the rule applies the sum (its float
    apply). A rule with fused quantized kernels (``quantized_send``/``quantized_apply``: EASGD,
    DOWNPOUR) does all of it in one pass instead; ``torch_path`` runs every step in torch ops
    (:mod:`.quantize_torch`)."""

    def __init__(self, plan: FragmentPlan, rule: SyncRule, comm: _dist.Comm, policy: int,
                 delay: bool, residuals: dict[str, list[torch.Tensor]], bits: int,
                 chunk_bytes: int | None = None, torch_path: bool = False) -> None:
        self.status = _status_vectors(plan)
        world = comm.world_size
        self._prepare, self._reduce, self._apply = Program(), Program(), Program()
        for device, status in self.status.items():
            self._prepare.add(device, native.prepare.zero(tensor_ref("status", status)))
        self.pieces: list[dict[str, torch.Tensor]] = []
        record_bytes = 0
        sends, publishes = [], []
        for piece in split_pieces(plan.pieces, world, bits, chunk_bytes):
            if len(piece.segments()) != 1:  # the averager refuses this first, naming comm_dtype
                raise ValueError("the quantized wire quantizes contiguous runs of parameters; its "
                                 "blocks would straddle local shards")
            device = piece.group.device
            status = self.status[device]
            n = piece.end - piece.start
            layout = quantize_torch.Layout(n, world, bits)
            b = {"send": torch.zeros(world * layout.record, dtype=torch.uint8, device=device),
                 "received": torch.zeros(world * layout.record, dtype=torch.uint8, device=device),
                 "own": torch.zeros(layout.record, dtype=torch.uint8, device=device),
                 "gathered": torch.zeros(world * layout.record, dtype=torch.uint8, device=device),
                 "server_residual": torch.zeros(layout.chunk, device=device)}
            residuals["server_residual"].append(b["server_residual"])
            self.pieces.append(b)
            me_bad = status[ME_BAD:ME_BAD + 1]
            residual = piece.buffer("residual")
            keep = torch.zeros(n, device=device) if delay else None
            fused = None if torch_path else rule.quantized_send(piece, residual, b["send"], world, me_bad,
                                                                  keep, bits)
            if fused is not None:
                if keep is not None:
                    b["keep"] = keep
                sends.append((device, fused))
                verdict = _verdict(b["gathered"][:1], status, policy, world)
                self._apply.add(device, rule.quantized_apply(piece, residual, b["send"], b["gathered"],
                                                             world, verdict, keep, bits))
            else:
                self._generic(piece, b, rule, layout, residual, me_bad, status, policy, delay, torch_path,
                              sends)
            if torch_path:
                publishes.append((device, torch_step(quantize_torch.publish, b["send"], layout, me_bad)))
                self._reduce.add(device, torch_step(quantize_torch.reduce, b["received"], b["own"],
                                                    b["server_residual"], layout, policy))
            else:
                publishes.append((device, native.prepare.publish_records(
                    tensor_ref("records", b["send"]), n, world, tensor_ref("me_bad", me_bad), bits=bits)))
                self._reduce.add(device, native.prepare.quantized_reduce(
                    tensor_ref("received", b["received"]), tensor_ref("own", b["own"]),
                    tensor_ref("server_residual", b["server_residual"]), n, world, policy, bits=bits))
            record_bytes += layout.record
        for device, step in sends + publishes:
            self._prepare.add(device, step)
        # all-to-all: (p - 1) records out; all-gather: this rank's record to p - 1 ranks.
        self.bytes_sent = 2 * (world - 1) * record_bytes if comm.distributed else 0
        self._local = not comm.distributed

    def _generic(self, piece: Piece, b: dict[str, torch.Tensor], rule: SyncRule, layout: "quantize_torch.Layout",
                 residual: torch.Tensor, me_bad: torch.Tensor, status: torch.Tensor, policy: int, delay: bool,
                 torch_path: bool, sends: list[tuple[torch.device, Any]]) -> None:
        """The wire around the rule's float send and apply: the contribution (kept as sent, for
        the residual and a delayed apply) and the de-quantized sum in float32 buffers."""
        device, n, world, bits = piece.group.device, layout.n, layout.world, layout.bits
        contribution, summed = torch.zeros(n, device=device), torch.zeros(n, device=device)
        # Held here: a native launch keeps only the buffers' addresses. "keep" is saved while
        # the fragment is in flight; the sum is written and read within the apply.
        b["keep" if delay else "contribution"], b["summed"] = contribution, summed
        sends.append((device, _send(rule, piece, contribution, me_bad, None, torch_path)))
        # The float apply reads the verdict from the gathered header's float32 flag.
        verdict = _verdict(b["gathered"][:4].view(torch.float32), status, policy, world)
        if torch_path:
            sends.append((device, torch_step(quantize_torch.send, contribution, residual, b["send"], layout,
                                             me_bad)))
            self._apply.add(device, torch_step(quantize_torch.apply, summed, residual, contribution, b["send"],
                                               b["gathered"], layout, policy, me_bad))
        else:
            sends.append((device, native.prepare.quantized_send(
                tensor_ref("x", contribution), None, None, tensor_ref("residual", residual),
                tensor_ref("records", b["send"]), world, nonfinite=tensor_ref("me_bad", me_bad), bits=bits)))
            self._apply.add(device, native.prepare.quantized_apply(
                tensor_ref("x", summed), None, None, tensor_ref("residual", residual), tensor_ref("sent", b["send"]),
                tensor_ref("gathered", b["gathered"]), world, guard=verdict.native(),
                keep=tensor_ref("keep", contribution), bits=bits))
        self._apply.add(device, _apply(rule, piece, summed, verdict, contribution if delay else None, torch_path))

    def start(self, comm, capturing, wait=None):
        self._prepare()
        if self._local:  # one rank: what it sent is what it receives
            for b in self.pieces:
                b["received"].copy_(b["send"])
            return []
        if capturing:
            for b in self.pieces:
                comm.all_to_all_single(b["received"], b["send"])
            return []
        return [comm.all_to_all_single(b["received"], b["send"], async_op=True) for b in self.pieces]

    def gather(self, comm, capturing, wait):
        self._reduce()
        if self._local:
            for b in self.pieces:
                b["gathered"].copy_(b["own"])
            return []
        if capturing:
            for b in self.pieces:
                comm.all_gather_single(b["gathered"], b["own"])
            return []
        return [comm.all_gather_single(b["gathered"], b["own"], async_op=True) for b in self.pieces]

    def finish(self):
        self._apply()


def split_pieces(pieces: tuple[Piece, ...], world: int, bits: int,
                 chunk_bytes: int | None) -> list[Piece]:
    """``pieces`` cut so that each one's record (what one peer receives of it) is about
    ``chunk_bytes`` (None: whole): each cut is a quantized unit of its own, in whole blocks
    per owner, so the collectives move it in messages a slow link's queue absorbs."""
    if chunk_bytes is None:
        return list(pieces)
    unit = QUANT_BLOCK * world  # every owner's chunk whole blocks
    step = max(unit, chunk_bytes * (8 // bits) * world // unit * unit)
    return [p.sub(lo, min(lo + step, p.end - p.start))
            for p in pieces for lo in range(0, p.end - p.start, step)]


def _segments(piece: Piece, lo: int, hi: int) -> list[tuple[Piece, int, int]]:
    """Elements [lo, hi) of ``piece`` (relative) cut into its segments: (segment, its relative
    start, end), the wire's slice of each."""
    if hi <= lo:
        return []
    return [(seg, seg.start - piece.start, seg.end - piece.start)
            for seg in piece.sub(lo, hi).segments()]


def _cut(keep: torch.Tensor | None, lo: int, hi: int) -> torch.Tensor | None:
    return None if keep is None else keep[lo:hi]


def _send(rule: SyncRule, piece: Piece, wire: torch.Tensor, me_bad: torch.Tensor,
          keep: torch.Tensor | None, torch_path: bool) -> Any:
    launch = None if torch_path else rule.send(piece, wire, me_bad, keep)
    return launch if launch is not None else torch_step(rule.send_torch, piece, wire, me_bad, keep)


def _apply(rule: SyncRule, piece: Piece, reduced: torch.Tensor, verdict: Verdict,
           keep: torch.Tensor | None, torch_path: bool) -> Any:
    launch = None if torch_path else rule.apply(piece, reduced, verdict, keep)
    return launch if launch is not None else torch_step(rule.apply_torch, piece, reduced, verdict, keep)
