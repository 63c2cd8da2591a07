"""Benchmarks shipped with the package, so an installed easgd_ext can measure itself:
``kernels`` (fused kernel bandwidth against torch's own ways and the copy ceiling), ``comm``
(exchange latency against a raw all-reduce, the same exchange in plain torch and PyTorch's
PeriodicModelAverager; ``--mode async``: the asynchronous centers against their floors) and
``step`` (the averager's cost in a training step). Every ratio they report is a speedup over a
peer measured in the same run: ``peer_seconds / our_seconds`` (> 1: faster); see
:mod:`easgd_ext.bench.cli`."""
