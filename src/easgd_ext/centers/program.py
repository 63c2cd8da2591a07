"""A prepared sequence of exchange steps: native launches (consecutive ones on one device run in
one native call, GIL released) and torch-level steps (Python callables of torch ops, for rules
that have no fused kernel yet). Built once; running it costs a few calls per device."""

from __future__ import annotations

from typing import Any, Callable

import torch

from .._native import native, num_threads, on_device, stream_of

Launch = Any  # native.Launch


class Program:
    def __init__(self) -> None:
        # (device, [launches]) runs and (None, callable) torch steps, in order
        self._runs: list[tuple[torch.device | None, Any]] = []

    def add(self, device: torch.device, step: Launch | Callable[[], None]) -> None:
        if callable(step) and not isinstance(step, native.Launch):
            self._runs.append((None, step))
        elif self._runs and self._runs[-1][0] == device:
            self._runs[-1][1].append(step)
        else:
            self._runs.append((device, [step]))

    def __call__(self) -> None:
        threads = num_threads()
        for device, what in self._runs:
            if device is None:
                what()
            else:
                with on_device(device):
                    native.run(what, stream_of(device), threads)

    def __len__(self) -> int:
        return len(self._runs)
