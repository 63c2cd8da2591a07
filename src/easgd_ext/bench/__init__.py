"""Benchmarks shipped with the package, so an installed easgd_ext can measure itself:
``kernels`` (fused kernel bandwidth against torch's own ways) and ``comm`` (exchange latency
against a raw all-reduce and PyTorch's PeriodicModelAverager)."""
