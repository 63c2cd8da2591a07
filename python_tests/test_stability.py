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


def _help_text(capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        stability.main(["--help"])
    assert exit_info.value.code == 0
    return " ".join(capsys.readouterr().out.split())  # argparse wraps to the terminal's width


def _cli_error(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        stability.main(argv)
    assert exit_info.value.code == 2  # an argparse usage error, not a crash
    return " ".join(capsys.readouterr().err.split())


def test_radius_matches_the_dense_cycle_of_turn_matrices():
    """The radii apply each turn as row updates; they are the product of the turn matrices."""
    for p in (1, 2, 3, 5):
        for eta_h, alpha in ((0.0, 0.0), (0.3, 0.7), (1.9, 1.2)):
            dense = stability.cycle(stability.easgd_turn(p, i, eta_h, alpha) for i in range(p))
            assert stability.easgd_radius(p, eta_h, alpha) == pytest.approx(
                stability.spectral_radius(dense), rel=1e-12, abs=1e-12)
        for eta, rho in ((0.0, 2.5), (0.001, 2.5), (0.5, 0.0), (1.0, 10.0)):
            dense = stability.cycle([stability.admm_turn(p, i, eta, 1.0, rho) for i in range(p)])
            assert stability.admm_radius(p, eta, 1.0, rho) == pytest.approx(
                stability.spectral_radius(dense), rel=1e-12, abs=1e-12)
    np.testing.assert_array_equal(stability.easgd_turn(2, 1, 0.25, 0.5),
                                  [[1, 0, 0], [0, 0.25, 0.5], [0, 0.5, 0.5]])
    # ADMM, p = 1: l' = l - x + c, x' = (1 - eta h - 2 eta rho) x + eta rho (l + 2 c), c' = x' - l'
    a = 0.1 * 2.0
    x_row, lam_row = [1 - 0.1 * 3.0 - 2 * a, a, 2 * a], [-1.0, 1.0, 1.0]
    np.testing.assert_allclose(stability.admm_turn(1, 0, 0.1, 3.0, 2.0),
                               [x_row, lam_row, np.subtract(x_row, lam_row)], atol=1e-15)


def test_cli_rejects_p_too_large_for_the_dense_cycle_matrix(capsys):
    """--p 100000 used to die allocating the 74.5 GiB cycle matrix."""
    err = _cli_error(capsys, ["--p", "100000", "--no-plots"])
    assert f"argument --p: must be at most {stability.MAX_P}, got 100000" in err
    assert "the cycle matrix is dense (74.5 GiB for EASGD, 298 GiB for ADMM)" in err
    assert f"1 to {stability.MAX_P}" in _help_text(capsys)


def test_cli_maps_need_no_plots_above_their_limit(capsys, tmp_path):
    err = _cli_error(capsys, ["--p", str(stability.MAX_P_MAPS + 1), "--out", str(tmp_path)])
    assert f"--p {stability.MAX_P_MAPS + 1} needs --no-plots" in err
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("eta, h, eta_h", [("10", "1", "10"), ("1.5", "2", "3"), ("4", "1", "4")])
def test_cli_eta_h_above_two_has_no_stable_alpha(capsys, eta, h, eta_h):
    """Used to print "analytic bound alpha <= nan"."""
    assert stability.main(["--eta", eta, "--h", h, "--no-plots"]) == 0
    out = capsys.readouterr().out
    assert "nan" not in out
    assert (f"(UNSTABLE); eta h = {eta_h} is outside [0, 2]: no alpha is stable (the local step "
            f"alone diverges)") in out


@pytest.mark.parametrize("option, what", [("--eta", "the learning rate"), ("--h", "the curvature"),
                                          ("--alpha", "the moving rate"),
                                          ("--rho", "the ADMM penalty")])
@pytest.mark.parametrize("value", ["-1", "-1e-9", "nan", "inf"])
def test_cli_rejects_negative_or_non_finite_parameters(capsys, option, what, value):
    err = _cli_error(capsys, [f"{option}={value}", "--no-plots"])
    assert f"argument {option}: {what} must be finite and >= 0 (" in err
    assert err.endswith(f"got {value}")


@pytest.mark.parametrize("option", ["--eta", "--h", "--alpha", "--rho"])
def test_cli_accepts_zero_parameters(capsys, option):
    assert stability.main([option, "0", "--no-plots"]) == 0
    assert "spectral radius" in capsys.readouterr().out


def test_verdict_separates_marginal_from_stable():
    assert stability.verdict(0.999) == "stable"
    assert stability.verdict(1.0 - 1e-9) == "stable"
    assert stability.verdict(1.0 + 1e-9) == "UNSTABLE"
    for radius in (1.0, 1.0 - 1e-13, 1.0 + 1e-13):
        assert stability.verdict(radius).startswith("marginally stable: radius 1")


@pytest.mark.parametrize("argv, easgd_marginal, admm_marginal", [
    (["--eta", "0"], True, True),
    (["--h", "0"], True, False),  # ADMM is unstable on a flat f: its multipliers drift
    (["--alpha", "0"], True, False),
    (["--rho", "0"], False, True),
])
def test_cli_labels_radius_one_as_marginal(capsys, argv, easgd_marginal, admm_marginal):
    """Radius exactly 1 used to be labelled "(stable)"."""
    assert stability.main(argv + ["--no-plots"]) == 0
    easgd_line, admm_line = capsys.readouterr().out.splitlines()[1:3]
    marginal = "(marginally stable: radius 1, the slowest errors neither grow nor shrink)"
    assert (marginal in easgd_line) == easgd_marginal, easgd_line
    assert (marginal in admm_line) == admm_marginal, admm_line
    if easgd_marginal:
        assert easgd_line.endswith("on the edge of the analytic bound")


@pytest.mark.parametrize("p", [1, 2, 3, 6])
def test_analytic_edge_has_radius_one(p):
    """easgd_stable's region is closed: on its edge eta h = 0 or alpha = 0 the radius is 1 for
    every p, which easgd_region and verdict both call marginal."""
    for eta_h, alpha in ((0.0, 0.0), (0.0, 0.5), (0.0, 1.0), (0.7, 0.0), (2.0, 0.0)):
        assert stability.easgd_stable(eta_h, alpha)
        assert stability.easgd_region(eta_h, alpha) == "on the edge of"
        assert stability.verdict(stability.easgd_radius(p, eta_h, alpha)).startswith("marginally")
    assert stability.easgd_region(1.0, 2 / 3) == "on the edge of"  # alpha at the bound
    assert stability.easgd_region(1.0, 0.5) == "inside"
    assert stability.easgd_region(1.0, 0.7) == "outside"
    assert stability.easgd_region(2.5, 0.0) == "outside"


def test_cli_help_shows_every_default_once(capsys):
    text = _help_text(capsys)
    options = [("--p P", "3"), ("--eta ETA", "0.001"), ("--h H", "1.0"), ("--alpha ALPHA", "0.5"),
               ("--rho RHO", "2.5"), ("--out OUT", "stability"), ("--no-plots", "False")]
    for (option, default), (next_option, _) in zip(options, options[1:] + [("", "")]):
        entry = text.split(f" {option} ", 1)[1].split(f" {next_option} ", 1)[0]
        assert entry.endswith(f"(default: {default})"), (option, entry)  # and so has a help string
    assert text.count("default") == 7, text  # one per option: no hand-written "(default 3)"


def test_cli_names_itself_and_explains_an_overflowing_cycle(capsys):
    with pytest.raises(SystemExit):
        stability.main(["--eta", "1e120", "--no-plots"])
    err = capsys.readouterr().err
    assert err.startswith("usage: python -m easgd_ext.stability")
    assert "the cycle matrix overflows float64" in err


def test_a_stable_point_beyond_the_bound_says_so_in_those_words(capsys):
    """p = 2, eta h = 0.8: alpha 0.79 is stable numerically but beyond the analytic bound 0.75,
    which is sufficient, not necessary: the line must not call it outside the stable region."""
    from easgd_ext import stability

    stability.main(["--p", "2", "--eta", "0.8", "--h", "1", "--alpha", "0.79", "--no-plots"])
    line = [l for l in capsys.readouterr().out.splitlines() if l.startswith("EASGD")][0]
    assert "(stable)" in line and line.endswith("outside the analytic bound")
