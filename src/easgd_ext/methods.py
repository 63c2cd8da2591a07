"""The methods, in one table: what each name means (which averager, which local optimizer,
which fixed settings) and what it supports. The command line (``train``, ``train --fsdp``), the
study, the simulator, the integrations (Lightning, accelerate) and the tests all read
:data:`METHODS` through :func:`method`; a name may have aliases, since the tools grew their own
spellings (``average``, ``local_sgd``) and their users' commands keep working.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import torch

from .averager import Averager, DiLoCoAverager, DownpourAverager, ElasticAverager, PeriodicAverager

# The elastic rule with an outer Nesterov step on the center (the study's easgd-outer).
EASGD_OUTER = {"outer_lr": 0.5, "outer_momentum": 0.9, "nesterov": True}


@dataclass(frozen=True)
class Method:
    """One method: ``averager`` (``None``: synchronous SGD, the mean gradient every step, no
    averager), whether its local steps use Nesterov momentum (EAMSGD), and the constructor
    arguments that make it this method (``fixed``)."""
    name: str
    averager: type[Averager] | None
    nesterov: bool = False
    fixed: Mapping[str, Any] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()

    @property
    def asynchronous(self) -> bool:
        """Whether it has ``mode="async"`` (the paper's asynchronous EASGD, EAMSGD, DOWNPOUR)."""
        return self.averager in (ElasticAverager, DownpourAverager) and not self.fixed

    @property
    def delays(self) -> bool:
        """Whether a delayed apply (``delay > 0``) keeps the steps since the send: its pull does.
        sync-sgd has no averager and delays nothing: the tools accept a delay beside it (a
        list of methods shares one ``--delay``) and it runs as without."""
        return self.averager in (None, ElasticAverager, DiLoCoAverager)

    @property
    def sends_difference(self) -> bool:
        """Whether what it sends is a difference, which the quantized wires (int8/int4/int2)
        and the narrower float wires carry (sync-sgd's mean gradient and averaging's parameters
        are not)."""
        return self.averager not in (None, PeriodicAverager)

    @property
    def elastic(self) -> bool:
        """Whether it takes ``beta``/``alpha`` (the elastic rule)."""
        return self.averager is ElasticAverager

    def local_optimizer(self, params: Iterable[torch.Tensor], lr: float,
                        momentum: float = 0.9) -> torch.optim.SGD:
        """Its local steps: plain SGD, or SGD with Nesterov ``momentum`` (EAMSGD)."""
        if self.nesterov:
            return torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=True)
        return torch.optim.SGD(params, lr=lr)

    def build(self, params: Iterable[torch.Tensor], **settings: Any) -> Averager | None:
        """Its averager over ``params`` (``None`` for sync-sgd): ``settings`` and its fixed
        ones go to the constructor (a setting that contradicts a fixed one is an error). The
        local optimizer is the caller's (:meth:`local_optimizer`)."""
        if self.averager is None:
            return None
        clash = [k for k, v in settings.items() if k in self.fixed and self.fixed[k] != v]
        if clash:
            raise ValueError(f"{self.name} fixes {', '.join(f'{k}={self.fixed[k]!r}' for k in clash)}; "
                             f"leave {', '.join(clash)} out or choose another method")
        return self.averager(params, **{**settings, **self.fixed})

    def rule_settings(self, beta: Any, allow_unstable: Any) -> dict[str, Any]:
        """The elastic rate arguments, where it takes them ({} elsewhere)."""
        return {"beta": beta, "allow_unstable": allow_unstable} if self.elastic else {}


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("sync-sgd", None),                    # the mean gradient every step (DDP)
    Method("local-sgd", PeriodicAverager, aliases=("average", "local_sgd")),
    Method("downpour", DownpourAverager),
    Method("easgd", ElasticAverager),
    Method("eamsgd", ElasticAverager, nesterov=True),
    Method("diloco", DiLoCoAverager),
    Method("easgd-outer", ElasticAverager, fixed=EASGD_OUTER),
)}
_BY_ALIAS = {alias: m for m in METHODS.values() for alias in (m.name, *m.aliases)}


def names(chosen: Iterable[str]) -> tuple[str, ...]:
    """``chosen`` names, each checked against the table (a tool's own selection of methods)."""
    out = tuple(chosen)
    for name in out:
        method(name)
    return out


def method(name: str) -> Method:
    """The method called ``name`` (or one of its aliases)."""
    found = _BY_ALIAS.get(name) if isinstance(name, str) else None
    if found is None:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHODS)} "
                         f"(or {', '.join(a for m in METHODS.values() for a in m.aliases)})")
    return found


# The integrations' names (Lightning's strategy registry, accelerate's method=): the averagers
# a framework's own optimizer drives (its optimizer makes EAMSGD, so that is "easgd" there).
INTEGRATION_METHODS = names(("easgd", "diloco", "downpour", "local_sgd"))


def integration_averager(name: object) -> type[Averager]:
    """The averager class of an integration's ``method=`` (``ValueError`` naming the choices)."""
    if name not in INTEGRATION_METHODS:
        raise ValueError(f"method must be one of {', '.join(map(repr, INTEGRATION_METHODS))}, "
                         f"got {name!r}")
    found = method(name).averager  # type: ignore[arg-type]
    assert found is not None
    return found
