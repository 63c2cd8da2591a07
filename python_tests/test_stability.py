"""The round-robin stability analysis against the paper's analytic condition."""

from __future__ import annotations

import numpy as np
import pytest

from easgd_ext import stability

ETA_H = np.linspace(0.02, 2.4, 35)
ALPHA = np.linspace(0.02, 1.3, 33)
MARGIN = 0.02  # grid points this close to the analytic boundary are not judged


def _near_boundary(eta_h: float, alpha: float) -> bool:
    return abs(eta_h - 2.0) < MARGIN or (eta_h <= 2.0 and
                                         abs(alpha - stability.easgd_alpha_bound(eta_h)) < MARGIN)


def test_one_worker_matches_the_analytic_condition_exactly():
    for eta_h in ETA_H:
        for alpha in ALPHA:
            if _near_boundary(eta_h, alpha):
                continue
            radius = stability.easgd_radius(1, eta_h, alpha)
            assert (radius <= 1.0) == stability.easgd_stable(eta_h, alpha), (eta_h, alpha, radius)


@pytest.mark.parametrize("p", [2, 3, 4, 6])
def test_analytic_region_is_stable_for_every_p(p):
    """Inside the region the cycle contracts for any p; well outside it diverges. (For even p
    the numerical region reaches a little beyond the analytic bound: the bound is sufficient.)"""
    for eta_h in ETA_H:
        for alpha in ALPHA:
            if _near_boundary(eta_h, alpha):
                continue
            radius = stability.easgd_radius(p, eta_h, alpha)
            if stability.easgd_stable(eta_h, alpha):
                assert radius < 1.0, (p, eta_h, alpha, radius)
            elif eta_h > 2.0 + MARGIN or alpha > stability.easgd_alpha_bound(eta_h) + 0.1:
                assert radius > 1.0, (p, eta_h, alpha, radius)


def test_boundary_has_radius_one():
    for eta_h in (0.3, 1.0, 1.7):
        alpha = float(stability.easgd_alpha_bound(eta_h))
        assert stability.easgd_radius(1, eta_h, alpha) == pytest.approx(1.0, abs=1e-9)


def test_admm_unstable_for_small_eta():
    """The paper's example: eta = 0.001, rho = 2.5, p = 3, h = 1 is just above 1, while EASGD
    with the same eta is stable."""
    radius = stability.admm_radius(3, 0.001, 1.0, 2.5)
    assert 1.0 < radius < 1.01
    assert stability.easgd_radius(3, 0.001, 0.5) < 1.0
    assert stability.admm_radius(3, 0.01, 1.0, 2.5) < 1.0  # a larger eta is stable here
    assert stability.admm_radius(2, 0.001, 1.0, 2.5) < 1.0  # and so is p = 2


def test_cli_prints_radii_and_writes_maps(tmp_path, capsys):
    assert stability.main(["--p", "3", "--eta", "0.001", "--rho", "2.5", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "ADMM  rho = 2.5: spectral radius" in out and "UNSTABLE" in out
    for name in ("easgd_p3.png", "admm_p3.png"):
        assert (tmp_path / name).stat().st_size > 10_000


def test_cli_rejects_bad_p():
    with pytest.raises(SystemExit):
        stability.main(["--p", "0", "--no-plots"])
