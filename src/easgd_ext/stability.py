"""Round-robin stability of EASGD and ADMM on a quadratic (paper section 4).

On f(x) = h x^2 / 2 with p workers taking turns (one worker per time step, in order), one
full cycle of p turns is a linear map of the joint state; the method is stable iff the map's
spectral radius is below 1, and marginally stable at exactly 1 (EASGD with eta h = 0 or
alpha = 0, ADMM with eta = 0 or rho = 0): there the slowest errors neither grow nor shrink.

EASGD, worker i's turn (state: x_1..x_p, center c)::

    x_i <- x_i - eta h x_i - alpha (x_i - c);    c <- c + alpha (x_i - c)   (old x_i)

radius at most 1 for every p iff 0 <= eta h <= 2 and 0 <= alpha <= (4 - 2 eta h) / (4 - eta h).

ADMM, worker i's turn (state: x_1..x_p, multipliers l_1..l_p, center c)::

    l_i <- l_i - (x_i - c);    x_i <- x_i - eta h x_i + eta rho (l_i - x_i + c);
    c <- mean_j (x_j - l_j)

which can be unstable even for a small eta (eta = 0.001, rho = 2.5, p = 3, h = 1).

    python -m easgd_ext.stability --p 3 --eta 0.001 --h 1 --alpha 0.5 --rho 2.5 --out plots/
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

# The cycle matrix is dense, (2p+1)^2 doubles for ADMM, and its eigenvalues cost O(p^3): at
# p = 1000 that is 30.5 MiB and seconds; at the p = 100000 users tried, 298 GiB.
MAX_P = 1000
# The maps compute about 20,000 radii: about 30 s at p = 50, minutes above.
MAX_P_MAPS = 50
# Radii this close to 1 are 1 (marginal), up to the eigensolver's rounding (5e-14 at p = 1000).
MARGINAL_TOL = 1e-12


def _easgd_step(m: np.ndarray, p: int, i: int, eta_h: float, alpha: float) -> None:
    """m <- (worker i's turn) @ m, in place. The turn rewrites only the rows of x_i and the
    center, so a cycle costs O(p^2) rather than p dense products."""
    x, c = m[i].copy(), m[p].copy()
    m[i] = (1.0 - eta_h - alpha) * x + alpha * c
    m[p] = alpha * x + (1.0 - alpha) * c


def _admm_step(m: np.ndarray, p: int, i: int, eta: float, h: float, rho: float) -> None:
    """m <- (worker i's turn) @ m, in place; the turn rewrites only the rows of x_i, l_i and c."""
    x, lam, c = i, p + i, 2 * p
    a = eta * rho
    new_lam = m[lam] - m[x] + m[c]
    m[x] = (1.0 - eta * h - a) * m[x] + a * (new_lam + m[c])
    m[lam] = new_lam
    m[c] = (m[:p].sum(axis=0) - m[p:c].sum(axis=0)) / p  # mean_j (x_j - l_j), new x_i and l_i


def easgd_turn(p: int, i: int, eta_h: float, alpha: float) -> np.ndarray:
    """The (p+1)x(p+1) matrix of worker i's turn; the center is the last coordinate."""
    m = np.eye(p + 1)
    _easgd_step(m, p, i, eta_h, alpha)
    return m


def admm_turn(p: int, i: int, eta: float, h: float, rho: float) -> np.ndarray:
    """The (2p+1)x(2p+1) matrix of worker i's turn: x at 0..p-1, multipliers at p..2p-1, the
    center last."""
    m = np.eye(2 * p + 1)
    _admm_step(m, p, i, eta, h, rho)
    return m


def cycle(turns: Iterable[np.ndarray]) -> np.ndarray:
    """The product of the turns, the first one rightmost."""
    m = None
    for t in turns:
        m = t.copy() if m is None else t @ m
    if m is None:
        raise ValueError("cycle of no turns")
    return m


def spectral_radius(m: np.ndarray) -> float:
    return float(np.max(np.abs(np.linalg.eigvals(m))))


def easgd_radius(p: int, eta_h: float, alpha: float) -> float:
    """Spectral radius of one round-robin cycle of EASGD."""
    m = np.eye(p + 1)
    for i in range(p):
        _easgd_step(m, p, i, eta_h, alpha)
    return spectral_radius(m)


def admm_radius(p: int, eta: float, h: float, rho: float) -> float:
    """Spectral radius of one round-robin cycle of ADMM."""
    m = np.eye(2 * p + 1)
    for i in range(p):
        _admm_step(m, p, i, eta, h, rho)
    return spectral_radius(m)


def verdict(radius: float) -> str:
    """Stable below radius 1, marginal at 1 (within MARGINAL_TOL), UNSTABLE above."""
    if abs(radius - 1.0) <= MARGINAL_TOL:
        return "marginally stable: radius 1, the slowest errors neither grow nor shrink"
    return "stable" if radius < 1.0 else "UNSTABLE"


def easgd_alpha_bound(eta_h: np.ndarray | float) -> np.ndarray | float:
    """The largest stable moving rate, (4 - 2 eta h) / (4 - eta h), for 0 <= eta h <= 2."""
    return (4.0 - 2.0 * np.asarray(eta_h)) / (4.0 - np.asarray(eta_h))


def easgd_stable(eta_h: float, alpha: float) -> bool:
    """The analytic condition: radius <= 1 for every p. The region is closed, and on its edge
    eta h = 0 or alpha = 0 the radius is exactly 1 (marginal; see easgd_region)."""
    return 0.0 <= eta_h <= 2.0 and 0.0 <= alpha <= float(easgd_alpha_bound(eta_h))


def easgd_region(eta_h: float, alpha: float) -> str:
    """Where (eta h, alpha) lies: "inside", "on the edge of" or "outside" the analytic stable
    region. On the edge eta h = 0 or alpha = 0 the radius is 1 for every p; at alpha = the bound
    it is 1 for p = 1 (the bound is sufficient, not necessary, for larger p)."""
    if not easgd_stable(eta_h, alpha):
        return "outside"
    if eta_h == 0.0 or alpha == 0.0 or abs(alpha - float(easgd_alpha_bound(eta_h))) <= MARGINAL_TOL:
        return "on the edge of"
    return "inside"


def easgd_map(p: int, eta_h: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    return np.array([[easgd_radius(p, e, a) for e in eta_h] for a in alpha])


def admm_map(p: int, eta: np.ndarray, rho: np.ndarray, h: float) -> np.ndarray:
    return np.array([[admm_radius(p, e, h, r) for e in eta] for r in rho])


def plot_easgd(p: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    eta_h = np.linspace(0.0, 2.2, 111)
    alpha = np.linspace(0.0, 1.2, 121)
    radius = easgd_map(p, eta_h, alpha)
    fig, ax = plt.subplots(figsize=(6, 4.5))
    mesh = ax.pcolormesh(eta_h, alpha, np.minimum(radius, 2.0), shading="auto", cmap="viridis")
    ax.contour(eta_h, alpha, radius, levels=[1.0], colors="white", linewidths=1.0)
    inside = np.linspace(0.0, 2.0, 200)
    ax.plot(inside, easgd_alpha_bound(inside), "r--", label=r"$\alpha = (4 - 2\eta h)/(4 - \eta h)$")
    ax.set_xlabel(r"$\eta h$")
    ax.set_ylabel(r"$\alpha$")
    ax.set_title(f"EASGD round-robin, p = {p}: spectral radius (white: radius 1)")
    fig.colorbar(mesh, ax=ax, label="spectral radius (clipped at 2)")
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_admm(p: int, h: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    eta = np.logspace(-4, 0, 81)
    rho = np.logspace(-1, 1.5, 81)
    radius = admm_map(p, eta, rho, h)
    fig, ax = plt.subplots(figsize=(6, 4.5))
    mesh = ax.pcolormesh(eta, rho, np.log10(radius), shading="auto", cmap="coolwarm",
                         vmin=-1e-3, vmax=1e-3)  # tight: the small-eta instability is slight
    ax.contour(eta, rho, radius, levels=[1.0], colors="black", linewidths=1.0)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(r"$\eta$")
    ax.set_ylabel(r"$\rho$")
    ax.set_title(f"ADMM round-robin, p = {p}, h = {h:g}: red = unstable (radius > 1)")
    fig.colorbar(mesh, ax=ax, label=r"$\log_{10}$ spectral radius (clipped)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _dense_size(n: int) -> str:
    """The memory of an n x n float64 matrix."""
    nbytes = 8 * n * n
    return f"{nbytes / 2**30:.3g} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.3g} MiB"


def _workers(text: str) -> int:
    """--p: argparse names the option in front of the message."""
    try:
        p = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if p < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {p}")
    if p > MAX_P:
        raise argparse.ArgumentTypeError(
            f"must be at most {MAX_P}, got {p}: the cycle matrix is dense ({_dense_size(p + 1)} "
            f"for EASGD, {_dense_size(2 * p + 1)} for ADMM) and its eigenvalues cost O(p^3) time")
    return p


def _nonnegative(what: str, why: str) -> Callable[[str], float]:
    """An argparse type: a finite float >= 0; `why` says what a negative value would mean."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid float value: {text!r}") from None
        if not (np.isfinite(value) and value >= 0.0):  # also rejects nan, which compares false
            raise argparse.ArgumentTypeError(f"{what} must be finite and >= 0 ({why}), got {text}")
        return value
    return parse


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m easgd_ext.stability",
        description="Round-robin stability of EASGD and ADMM on f(x) = h x^2 / 2 (Zhang et al. "
        "2015, section 4): the spectral radius of one cycle of p worker turns, < 1 stable, "
        "1 marginally stable, > 1 unstable.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    eta = _nonnegative("the learning rate", "a negative one climbs f; 0, no gradient steps, "
                       "is allowed")
    h = _nonnegative("the curvature", "a negative one makes x = 0 a maximum of f; 0, a flat f, "
                     "is allowed")
    alpha = _nonnegative("the moving rate", "a negative one pushes workers and center apart; 0, "
                         "where the workers ignore the center, is allowed")
    rho = _nonnegative("the ADMM penalty", "a negative one pushes each worker away from the "
                       "center; 0, where the workers ignore it, is allowed")
    parser.add_argument("--p", type=_workers, default=3,
                        help=f"workers, 1 to {MAX_P} (the cycle matrix is dense: (2p+1)^2 doubles "
                        f"for ADMM, {_dense_size(2 * MAX_P + 1)} and seconds at p = {MAX_P}); the "
                        f"maps need p <= {MAX_P_MAPS} or --no-plots")
    parser.add_argument("--eta", type=eta, default=0.001, help="learning rate, >= 0")
    parser.add_argument("--h", type=h, default=1.0,
                        help="curvature of the quadratic, >= 0; 0 is a flat f")
    parser.add_argument("--alpha", type=alpha, default=0.5,
                        help="EASGD moving rate, >= 0; 0: the workers ignore the center")
    parser.add_argument("--rho", type=rho, default=2.5,
                        help="ADMM penalty, >= 0; 0: the workers ignore the center")
    parser.add_argument("--out", type=Path, default=Path("stability"),
                        help="folder for the PNG maps")
    parser.add_argument("--no-plots", action="store_true",
                        help="print the radii only, without the maps")
    args = parser.parse_args(argv)
    if args.p > MAX_P_MAPS and not args.no_plots:
        parser.error(f"--p {args.p} needs --no-plots: the maps compute about 20,000 radii, too "
                     f"slow above p = {MAX_P_MAPS}")

    eta_h = args.eta * args.h
    with np.errstate(over="ignore", invalid="ignore"):
        try:
            r_easgd = easgd_radius(args.p, eta_h, args.alpha)
            r_admm = admm_radius(args.p, args.eta, args.h, args.rho)
        except np.linalg.LinAlgError:
            r_easgd = r_admm = float("nan")
    if not (np.isfinite(r_easgd) and np.isfinite(r_admm)):
        parser.error(f"--eta {args.eta:g} --h {args.h:g} --alpha {args.alpha:g} --rho {args.rho:g}: "
                     "the cycle matrix overflows float64; such steps diverge at once (eta h far "
                     "above 2)")
    if eta_h <= 2.0:  # eta, h >= 0, so eta h >= 0 here
        analytic = (f"analytic bound alpha <= {float(easgd_alpha_bound(eta_h)):.6g}, "
                    f"{easgd_region(eta_h, args.alpha)} the analytic bound")
    else:  # the bound's formula means nothing here: it is positive again for eta h > 4
        analytic = (f"eta h = {eta_h:g} is outside [0, 2]: no alpha is stable (the local step "
                    f"alone diverges)")
    print(f"p = {args.p}, eta = {args.eta:g}, h = {args.h:g} (eta h = {eta_h:g})")
    print(f"EASGD alpha = {args.alpha:g}: spectral radius {r_easgd:.9f} ({verdict(r_easgd)}); "
          f"{analytic}")
    print(f"ADMM  rho = {args.rho:g}: spectral radius {r_admm:.9f} ({verdict(r_admm)})")
    if not args.no_plots:
        args.out.mkdir(parents=True, exist_ok=True)
        plot_easgd(args.p, args.out / f"easgd_p{args.p}.png")
        plot_admm(args.p, args.h, args.out / f"admm_p{args.p}.png")
        print(f"wrote {args.out / f'easgd_p{args.p}.png'} and {args.out / f'admm_p{args.p}.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
