"""The update rules: what EASGD, DOWNPOUR and periodic averaging do in an exchange.

An :class:`Algorithm` names itself, its rates and its per-worker buffers, and offers its rule in
each *form* it supports; a center asks only for the form it runs:

* ``algorithm.sync`` (:class:`SyncRule`), for the replicated center: what a worker puts on the
  wire (:meth:`SyncRule.send`, which reads but never writes what the worker trains with) and how
  it takes one all-reduced bucket (:meth:`SyncRule.apply`, guarded by the exchange's verdict).
  Each is a fused native launch, or, for a rule whose kernel does not exist yet, torch ops
  (:meth:`SyncRule.send_torch`, :meth:`SyncRule.apply_torch`: slower, but with no host read and
  still one collective per bucket). Every rule here has both, and the tests hold the fused
  kernels to the torch path bit for bit.
* ``algorithm.asynchronous`` (:class:`AsyncRule`, or ``None``), for the shared-memory center
  (:meth:`AsyncRule.chunk_rule`, applied chunk by chunk under the chunks' locks) and the sharded
  center (:meth:`AsyncRule.payload` on the worker, :meth:`AsyncRule.serve` on the server: the
  same fused kernels, prepared once).

Adding an element-wise synchronous rule: a :class:`SyncRule` with ``send_torch``/``apply_torch``
is enough to train with it; its fused kernel (functor, Args, builder, table row, reference: see
:mod:`easgd_ext.ops`) then replaces them through ``send``/``apply``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ._native import native, tensor_ref
from .flat_params import FlatGroup, ParamGroup


def _refs(**tensors: torch.Tensor) -> dict[str, Any]:
    return {name: tensor_ref(name, t) for name, t in tensors.items()}


@dataclass(frozen=True)
class Piece:
    """Elements [start, end) of one flat group (a :class:`~easgd_ext.flat_params.FlatGroup`,
    or the local shards of DTensor parameters, a :class:`~easgd_ext.dtensor_params.ShardGroup`):
    what one wire buffer or bucket covers. Its buffers are contiguous; the worker's own values
    ``x`` are contiguous within each of :meth:`segments` (a flat group's piece is one segment)."""
    group: ParamGroup
    start: int
    end: int

    @property
    def x(self) -> torch.Tensor:
        return self.group.x_slice(self.start, self.end)

    def segments(self) -> list["Piece"]:
        """This piece cut where the worker's storage is not contiguous (one local shard each);
        a rule's launches are prepared per segment."""
        bounds = self.group.segment_bounds(self.start, self.end)
        if bounds == [(self.start, self.end)]:
            return [self]
        return [Piece(self.group, a, b) for a, b in bounds]

    def buffer(self, name: str) -> torch.Tensor:
        return self.group.buffers[name][self.start:self.end]

    def sub(self, start: int, end: int) -> "Piece":
        """Elements [start, end) of this piece (relative offsets)."""
        return Piece(self.group, self.start + start, self.start + end)


@dataclass(frozen=True)
class Verdict:
    """The exchange's verdict as the apply step reads it, on the device: ``bad_ranks`` (the
    all-reduced flag in the wire's header element: how many ranks flagged), ``me_bad`` (this
    rank's flag), the policy code (0 skip, 1 reset), the ranks in the all-reduce, and the status
    slots the apply step fills (``verdict``: the count seen; ``overflow``: a sum was not
    finite)."""
    bad_ranks: torch.Tensor
    me_bad: torch.Tensor
    policy: int
    world: int
    verdict: torch.Tensor
    overflow: torch.Tensor

    def native(self) -> Any:
        return native.prepare.Guard(tensor_ref("bad_ranks", self.bad_ranks),
                                    tensor_ref("me_bad", self.me_bad), self.policy, self.world,
                                    tensor_ref("verdict", self.verdict))

    # The torch-level path's reading of it: device tensors, never a host read.
    def bad(self) -> torch.Tensor:
        return self.bad_ranks.float()

    def applies(self) -> torch.Tensor:
        """Whether anything is written: under "skip" only when no rank flagged."""
        return self.bad() == 0 if self.policy == 0 else torch.ones_like(self.me_bad, dtype=torch.bool)

    def resets(self) -> torch.Tensor:
        """Whether this rank restarts from the center (under "reset", when it flagged)."""
        return (self.me_bad != 0) if self.policy == 1 else torch.zeros_like(self.me_bad, dtype=torch.bool)

    def record(self, overflowed: torch.Tensor) -> None:
        """What the fused kernels record: the count seen, and an overflow where anything was
        written and a sum element was not finite."""
        self.verdict.copy_(self.bad())
        self.overflow.copy_(torch.maximum(self.overflow, (overflowed & self.applies()).float()))


# A step of an exchange: a native launch (run in order with its neighbours in one native call)
# or a Python callable of torch ops.
Step = Any


def flag_nonfinite(flag: torch.Tensor, values: torch.Tensor) -> None:
    """``flag = 1`` if ``values`` holds an Inf/NaN (it is never cleared here: several sends
    share one flag), on the device."""
    torch.maximum(flag, (~torch.isfinite(values)).any().float().reshape(flag.shape), out=flag)


class SyncRule:
    """The synchronous form of a rule. ``send``/``apply`` return fused launches (``None``: use
    the torch path); ``send_torch``/``apply_torch`` do the same with torch ops.

    ``keep`` (given where the sum is applied steps after the send, ``delay > 0``, by rules that
    allow it: ``supports_delay``) holds, in the wire's dtype, what the send computed for the
    apply to use then.

    The quantized wires (8, 4 or 2 bits a value, with error feedback) carry any rule whose
    contribution is a difference (``quantizable``): the wire quantizes what ``send`` writes into
    a float32 buffer, and hands ``apply`` the de-quantized sum. ``quantized_send`` and
    ``quantized_apply`` are optional fused kernels doing all of it in one pass (``None``: the
    rule has none, and the wire goes around its float steps)."""

    supports_delay: bool = False
    quantizable: ClassVar[bool] = True       # its contribution is a difference the wire may quantize
    no_int8: ClassVar[str] = ""              # why not, where it is not

    def send(self, piece: Piece, wire: torch.Tensor, me_bad: torch.Tensor,
             keep: torch.Tensor | None = None) -> Step | None:
        return None

    def apply(self, piece: Piece, reduced: torch.Tensor, verdict: Verdict,
              keep: torch.Tensor | None = None) -> Step | None:
        return None

    def send_torch(self, piece: Piece, wire: torch.Tensor, me_bad: torch.Tensor,
                   keep: torch.Tensor | None = None) -> None:
        """Writes this worker's contribution into ``wire`` (and ``keep``) and sets ``me_bad`` if
        any stored value is Inf/NaN."""
        raise NotImplementedError

    def apply_torch(self, piece: Piece, reduced: torch.Tensor, verdict: Verdict,
                    keep: torch.Tensor | None = None) -> None:
        """Consumes ``reduced`` (the all-reduced elements of ``piece``), as the verdict says."""
        raise NotImplementedError

    def quantized_send(self, piece: Piece, residual: torch.Tensor, records: torch.Tensor,
                       world: int, me_bad: torch.Tensor, keep: torch.Tensor | None,
                       bits: int = 8) -> Step | None:
        return None

    def quantized_apply(self, piece: Piece, residual: torch.Tensor, sent: torch.Tensor,
                        gathered: torch.Tensor, world: int, verdict: Verdict,
                        keep: torch.Tensor | None, bits: int = 8) -> Step | None:
        return None


class AsyncRule:
    """The asynchronous form of a rule: against a shared-memory center, and the worker's and
    the server's halves of an exchange with a sharded one."""

    def chunk_rule(self, group: FlatGroup) -> Any:
        """The native rule the shared center's exchange applies chunk by chunk."""
        raise NotImplementedError

    def payload(self, group: FlatGroup, out: torch.Tensor) -> Step | None:
        """The launch that writes what the worker sends the servers into ``out`` (a buffer of
        the group's dtype and device); ``None``: it sends ``x`` itself."""
        return None

    def serve(self, inbox: torch.Tensor, shard: torch.Tensor) -> Step:
        """Server side, prepared once: the launch that updates the center ``shard`` from a
        worker's ``inbox`` and leaves the reply in ``inbox``."""
        raise NotImplementedError

    def take_reply(self, group: FlatGroup, reply: torch.Tensor) -> None:
        """Worker side: the new parameters (and worker buffers) from the servers' reply."""
        with torch.no_grad():
            group.flat.copy_(reply)


class Algorithm:
    """Base of the update rules. ``name`` travels in checkpoints; ``worker_buffers`` are kept
    per flat group besides the center (and saved with it); ``center_buffers`` (float32, zeros
    at the start) live beside the center where it lives, like an outer optimizer's momentum;
    ``has_center`` is False where the workers themselves are the result (averaging). ``sync``
    is the synchronous form; ``asynchronous`` the asynchronous one, or ``None``."""

    name: ClassVar[str] = ""
    worker_buffers: ClassVar[tuple[str, ...]] = ()
    center_buffers: tuple[str, ...] = ()
    has_center: ClassVar[bool] = True
    sync: SyncRule
    asynchronous: AsyncRule | None = None
    sync_only: str = "its update needs every worker's contribution at once"

    def settings(self) -> dict[str, Any]:
        """What must agree across ranks and be restored from checkpoints (rates)."""
        return {}

    def init_buffers(self, group: ParamGroup) -> None:
        """Allocate the per-group worker buffers (called once the parameters are final)."""


# ---- EASGD ---------------------------------------------------------------------------------------
class ElasticDifferenceSend(SyncRule):
    """The send of the elastic family: ``d = alpha (x - c)`` on the wire (and, with a delay, in
    ``keep``: x has moved on by the apply, and loses exactly what it sent). Its rules differ in
    how they apply the sum."""

    supports_delay = True

    def __init__(self, alpha: float) -> None:
        self.alpha = alpha

    def send(self, piece, wire, me_bad, keep=None):
        return native.prepare.elastic_difference(
            **_refs(x=piece.x, center=piece.buffer("center"), wire=wire, nonfinite=me_bad),
            alpha=self.alpha, keep=None if keep is None else tensor_ref("keep", keep))

    def _difference(self, piece: Piece, wire_dtype: torch.dtype) -> torch.Tensor:
        # float32 arithmetic as the kernel does it: alpha * (x - c), rounded once to the wire.
        return ((piece.x.float() - piece.buffer("center")) * self.alpha).to(wire_dtype)

    def send_torch(self, piece, wire, me_bad, keep=None):
        wire.copy_(self._difference(piece, wire.dtype))
        if keep is not None:
            keep.copy_(wire)
        flag_nonfinite(me_bad, wire)


class ElasticSync(ElasticDifferenceSend):
    """EASGD: ``d`` on the wire; then ``x -= d``, ``c += sum``. Its quantized wire is fused."""

    def apply(self, piece, reduced, verdict, keep=None):
        return native.prepare.sync_apply(
            **_refs(x=piece.x, center=piece.buffer("center"), reduced=reduced), alpha=self.alpha,
            guard=verdict.native(), nonfinite=tensor_ref("overflow", verdict.overflow),
            keep=None if keep is None else tensor_ref("keep", keep))

    def quantized_send(self, piece, residual, records, world, me_bad, keep, bits=8):
        return native.prepare.quantized_send(
            tensor_ref("x", piece.x), tensor_ref("center", piece.buffer("center")), None,
            tensor_ref("residual", residual), tensor_ref("records", records), world, self.alpha,
            nonfinite=tensor_ref("me_bad", me_bad), keep=None if keep is None else tensor_ref("keep", keep),
            bits=bits)

    def quantized_apply(self, piece, residual, sent, gathered, world, verdict, keep, bits=8):
        return native.prepare.quantized_apply(
            tensor_ref("x", piece.x), tensor_ref("center", piece.buffer("center")), None,
            tensor_ref("residual", residual), tensor_ref("sent", sent), tensor_ref("gathered", gathered),
            world, self.alpha, guard=verdict.native(), keep=None if keep is None else tensor_ref("keep", keep),
            bits=bits)

    def apply_torch(self, piece, reduced, verdict, keep=None):
        x, c = piece.x, piece.buffer("center")
        xf, s = x.float(), reduced.float()
        kept = ~torch.isfinite(s)  # an overflowed sum leaves that element alone
        c_new = torch.where(kept, c, c + s)
        d = (keep if keep is not None else self._difference(piece, reduced.dtype)).float()
        x_new = torch.where(verdict.resets(), c_new, torch.where(kept, xf, xf - d)).to(x.dtype)
        applies = verdict.applies()
        verdict.record(kept.any())
        x.copy_(torch.where(applies, x_new, x))
        c.copy_(torch.where(applies, c_new, c))


class ElasticAsync(AsyncRule):
    """``e = alpha (x - c)``; ``x -= e``; ``c += e``, one worker at a time."""

    def __init__(self, alpha: float) -> None:
        self.alpha = alpha

    def chunk_rule(self, group):
        return native.ChunkRule.elastic(tensor_ref("x", group.flat), self.alpha)

    def serve(self, inbox, shard):
        # The worker sent x; the reply is its new x, and the shard gained what x lost.
        return native.prepare.async_exchange(**_refs(x=inbox, center=shard), alpha=self.alpha)


class Elastic(Algorithm):
    """EASGD (and EAMSGD, with a Nesterov-momentum local optimizer) with moving rate ``alpha``."""

    name = "easgd"

    def __init__(self, alpha: float, beta: float) -> None:
        self.alpha, self.beta = alpha, beta
        self.sync = ElasticSync(alpha)
        self.asynchronous = ElasticAsync(alpha)

    def settings(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "beta": self.beta}


# ---- an outer optimizer on the center -------------------------------------------------------------
class OuterSync(ElasticDifferenceSend):
    """EASGD's wire, ``d = alpha (x - c)``; then an outer (Nesterov) momentum step on the center
    from the sum: ``g = sum`` (``normalize``: over the ranks that sent), ``m = mu m + g``,
    ``c += lr (g + mu m)`` (Nesterov) or ``lr m``; the worker pulled by ``d`` towards the old
    center, or with ``pull_to_new`` by ``pull (x - c_new)`` (``pull = 1``: reset to it). A
    delayed apply with ``pull_to_new`` keeps the worker's progress since the send: ``x -= pull
    (d - (c_new - c))``, the part of the center's move the worker has not made (this reads
    ``d`` as ``x_sent - c``: ``pull_to_new`` needs ``alpha = 1``, DiLoCo's wire)."""

    def __init__(self, alpha: float, lr: float, mu: float, nesterov: bool, pull_to_new: bool,
                 normalize: bool, pull: float | None = None) -> None:
        super().__init__(alpha)
        self.lr, self.mu, self.nesterov = lr, mu, nesterov
        self.pull_to_new, self.normalize = pull_to_new, normalize
        if pull_to_new and alpha != 1.0:
            raise ValueError(f"pull_to_new sends d = x - c: alpha must be 1, got {alpha}")
        # float32, as the kernel holds it: its "pull == 1" test and the torch path's then agree
        self.pull = torch.tensor(alpha if pull is None else pull, dtype=torch.float32).item()

    def apply(self, piece, reduced, verdict, keep=None):
        return native.prepare.outer_apply(
            **_refs(x=piece.x, center=piece.buffer("center"), momentum=piece.buffer("momentum"),
                    reduced=reduced), alpha=self.alpha, lr=self.lr, mu=self.mu,
            nesterov=float(self.nesterov), pull_to_new=float(self.pull_to_new),
            normalize=float(self.normalize), guard=verdict.native(),
            nonfinite=tensor_ref("overflow", verdict.overflow),
            keep=None if keep is None else tensor_ref("keep", keep), pull=self.pull)

    def apply_torch(self, piece, reduced, verdict, keep=None):
        x, c, m = piece.x, piece.buffer("center"), piece.buffer("momentum")
        xf, s = x.float(), reduced.float()
        kept = ~torch.isfinite(s)
        bad = verdict.bad()
        healthy = verdict.world - bad
        # world / healthy as the kernel divides: one float32 division
        world = torch.full_like(healthy, float(verdict.world))
        scale = torch.where((healthy > 0) & torch.tensor(self.normalize, device=bad.device),
                            world / torch.where(healthy > 0, healthy, torch.ones_like(healthy)),
                            torch.ones_like(healthy))
        g = s * scale
        m_new = self.mu * m + g
        step = g + self.mu * m_new if self.nesterov else m_new
        c_new = c + self.lr * step
        if self.pull_to_new and keep is not None:
            pulled = xf - self.pull * (keep.float() - (c_new - c))
        elif self.pull_to_new:
            pulled = c_new if self.pull == 1.0 else xf - self.pull * (xf - c_new)
        else:
            d = (keep if keep is not None else self._difference(piece, reduced.dtype)).float()
            pulled = xf - d
        x_new = torch.where(verdict.resets(), c_new, torch.where(kept, xf, pulled)).to(x.dtype)
        applies = verdict.applies()
        verdict.record(kept.any())
        x.copy_(torch.where(applies, x_new, x))
        c.copy_(torch.where(applies & ~kept, c_new, c))
        m.copy_(torch.where(applies & ~kept, m_new, m))


class ElasticOuter(Algorithm):
    """EASGD whose center moves by an outer (Nesterov) momentum step on the summed elastic
    differences, the workers pulled by ``alpha`` as in EASGD. ``outer_lr = 1``,
    ``outer_momentum = 0`` is EASGD itself, bit for bit."""

    name = "easgd"
    center_buffers = ("momentum",)
    sync_only = "an outer optimizer steps on the sum of every worker's difference"

    def __init__(self, alpha: float, beta: float, outer_lr: float, outer_momentum: float,
                 nesterov: bool) -> None:
        self.alpha, self.beta = alpha, beta
        self.outer_lr, self.outer_momentum, self.nesterov = outer_lr, outer_momentum, nesterov
        self.sync = OuterSync(alpha, outer_lr, outer_momentum, nesterov, pull_to_new=False,
                              normalize=False)

    def settings(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "beta": self.beta, "outer_lr": self.outer_lr,
                "outer_momentum": self.outer_momentum, "nesterov": self.nesterov}


class DiLoCo(Algorithm):
    """DiLoCo (Douillard et al., 2023): every tau steps the pseudo-gradient ``center - mean_i
    x_i``, an outer (Nesterov) momentum step on the center, every worker reset to the new
    center. The elastic family's other corner: EASGD's wire with ``alpha = 1`` and the outer
    step scaled by ``1 / p``, every worker pulled all the way to the new center, or with
    ``update_alpha = a`` to ``a x + (1 - a) c_new`` (Streaming DiLoCo's mixing)."""

    name = "diloco"
    center_buffers = ("momentum",)
    sync_only = "DiLoCo averages every worker's pseudo-gradient; use mode='sync'"

    def __init__(self, workers: int, outer_lr: float, outer_momentum: float, nesterov: bool,
                 update_alpha: float = 0.0) -> None:
        self.outer_lr, self.outer_momentum, self.nesterov = outer_lr, outer_momentum, nesterov
        self.update_alpha = update_alpha
        # sum_i (x_i - c) = -p (c - mean x): the outer step on the mean is lr / p on the sum
        self.sync = OuterSync(1.0, outer_lr / workers, outer_momentum, nesterov, pull_to_new=True,
                              normalize=True, pull=1.0 - update_alpha)

    def settings(self) -> dict[str, Any]:
        settings = {"outer_lr": self.outer_lr, "outer_momentum": self.outer_momentum,
                    "nesterov": self.nesterov}
        if self.update_alpha:  # absent at 0: checkpoints from before it existed still match
            settings["fragment_update_alpha"] = self.update_alpha
        return settings


# ---- DOWNPOUR ------------------------------------------------------------------------------------
class DownpourSync(SyncRule):
    """``v = x - x_last`` on the wire; then ``c += sum``, ``x = x_last = c``."""

    def send(self, piece, wire, me_bad, keep=None):
        return native.prepare.downpour_push(
            **_refs(x=piece.x, x_last=piece.buffer("x_last"), wire=wire, nonfinite=me_bad))

    def quantized_send(self, piece, residual, records, world, me_bad, keep, bits=8):
        return native.prepare.quantized_send(
            tensor_ref("x", piece.x), None, tensor_ref("x_last", piece.buffer("x_last")),
            tensor_ref("residual", residual), tensor_ref("records", records), world,
            nonfinite=tensor_ref("me_bad", me_bad), bits=bits)

    def quantized_apply(self, piece, residual, sent, gathered, world, verdict, keep, bits=8):
        return native.prepare.quantized_apply(
            tensor_ref("x", piece.x), tensor_ref("center", piece.buffer("center")),
            tensor_ref("x_last", piece.buffer("x_last")), tensor_ref("residual", residual),
            tensor_ref("sent", sent), tensor_ref("gathered", gathered), world, guard=verdict.native(),
            bits=bits)

    def apply(self, piece, reduced, verdict, keep=None):
        return native.prepare.downpour_pull(
            **_refs(center=piece.buffer("center"), reduced=reduced, x=piece.x,
                    x_last=piece.buffer("x_last")),
            guard=verdict.native(), nonfinite=tensor_ref("overflow", verdict.overflow))

    def send_torch(self, piece, wire, me_bad, keep=None):
        wire.copy_(piece.x.float() - piece.buffer("x_last").float())
        flag_nonfinite(me_bad, wire)

    def apply_torch(self, piece, reduced, verdict, keep=None):
        c, x, last = piece.buffer("center"), piece.x, piece.buffer("x_last")
        s = reduced.float()
        kept = ~torch.isfinite(s)
        c_new = torch.where(kept, c, c + s)
        x_new = torch.where(kept, x.float(), c_new).to(x.dtype)
        applies = verdict.applies()
        verdict.record(kept.any())
        c.copy_(torch.where(applies, c_new, c))
        x.copy_(torch.where(applies, x_new, x))
        last.copy_(torch.where(applies, x_new, last))


class DownpourAsync(AsyncRule):
    """``c += x - x_last``; ``x = x_last = c``, one worker at a time."""

    def chunk_rule(self, group):
        return native.ChunkRule.downpour(tensor_ref("x", group.flat),
                                         tensor_ref("x_last", group.buffers["x_last"]))

    def payload(self, group, out):
        return native.prepare.downpour_push(
            **_refs(x=group.flat, x_last=group.buffers["x_last"], wire=out))

    def serve(self, inbox, shard):
        # inbox holds v = x - x_last; c += v, and the reply is the new center (in inbox).
        return native.prepare.downpour_pull(**_refs(center=shard, reduced=inbox, x=inbox, x_last=inbox))

    def take_reply(self, group, reply):
        with torch.no_grad():
            group.flat.copy_(reply)
            group.buffers["x_last"].copy_(group.flat)


class Downpour(Algorithm):
    """DOWNPOUR: push the change since the last pull into the center, pull the center."""

    name = "downpour"
    worker_buffers = ("x_last",)

    def __init__(self) -> None:
        self.sync = DownpourSync()
        self.asynchronous = DownpourAsync()

    def init_buffers(self, group):
        group.buffers["x_last"] = group.read_x().clone()


# ---- periodic averaging -----------------------------------------------------------------------------
class AveragingSync(SyncRule):
    """``x`` on the wire; then ``x = sum / healthy ranks``."""

    quantizable = False
    no_int8 = ("the quantized wires carry differences; averaging sends the parameters themselves, "
               "which 8 bits and fewer cannot carry")

    def send(self, piece, wire, me_bad, keep=None):
        return native.prepare.average_send(**_refs(x=piece.x, wire=wire, nonfinite=me_bad))

    def apply(self, piece, reduced, verdict, keep=None):
        return native.prepare.average_apply(
            **_refs(x=piece.x, reduced=reduced), scale=1.0 / max(1, verdict.world),
            guard=verdict.native(), nonfinite=tensor_ref("overflow", verdict.overflow))

    def send_torch(self, piece, wire, me_bad, keep=None):
        wire.copy_(piece.x)
        flag_nonfinite(me_bad, wire)

    def apply_torch(self, piece, reduced, verdict, keep=None):
        x = piece.x
        healthy = verdict.world - verdict.bad()
        scale = 1.0 / healthy  # float32, as the kernel divides
        s = reduced.float()
        kept = ~torch.isfinite(s)
        x_new = torch.where(kept, x.float(), s * scale).to(x.dtype)
        applies = verdict.applies() & (healthy > 0)  # nobody left to average: nothing changes
        verdict.verdict.copy_(verdict.bad())
        verdict.overflow.copy_(torch.maximum(verdict.overflow, (kept.any() & applies).float()))
        x.copy_(torch.where(applies, x_new, x))


class Averaging(Algorithm):
    """Periodic model averaging: every worker becomes the mean of all workers."""

    name = "average"
    has_center = False
    sync_only = "averaging all workers is synchronous by definition"

    def __init__(self) -> None:
        self.sync = AveragingSync()

