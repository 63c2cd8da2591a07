"""Round-robin stability of EASGD and ADMM on a quadratic (paper section 4).

On f(x) = h x^2 / 2 with p workers taking turns (one worker per time step, in order), one
full cycle of p turns is a linear map of the joint state; the method is stable iff the map's
spectral radius is at most 1.

EASGD, worker i's turn (state: x_1..x_p, center c)::

    x_i <- x_i - eta h x_i - alpha (x_i - c);    c <- c + alpha (x_i - c)   (old x_i)

stable iff 0 <= eta h <= 2 and 0 <= alpha <= (4 - 2 eta h) / (4 - eta h), for every p.

ADMM, worker i's turn (state: x_1..x_p, multipliers l_1..l_p, center c)::

    l_i <- l_i - (x_i - c);    x_i <- x_i - eta h x_i + eta rho (l_i - x_i + c);
    c <- mean_j (x_j - l_j)

which can be unstable even for a small eta (eta = 0.001, rho = 2.5, p = 3, h = 1).

    python -m easgd_ext.stability --p 3 --eta 0.001 --h 1 --alpha 0.5 --rho 2.5 --out plots/
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np


def easgd_turn(p: int, i: int, eta_h: float, alpha: float) -> np.ndarray:
    """The (p+1)x(p+1) matrix of worker i's turn; the center is the last coordinate."""
    m = np.eye(p + 1)
    m[i, i] = 1.0 - eta_h - alpha
    m[i, p] = alpha
    m[p, i] = alpha
    m[p, p] = 1.0 - alpha
    return m


def admm_turn(p: int, i: int, eta: float, h: float, rho: float) -> np.ndarray:
    """The (2p+1)x(2p+1) matrix of worker i's turn: x at 0..p-1, multipliers at p..2p-1, the
    center last."""
    n, x, lam, c = 2 * p + 1, i, p + i, 2 * p
    update = np.eye(n)
    # l_i' = l_i - x_i + c
    update[lam] = 0.0
    update[lam, lam], update[lam, x], update[lam, c] = 1.0, -1.0, 1.0
    # x_i' = (1 - eta h - eta rho) x_i + eta rho (l_i' + c), with l_i' substituted
    a = eta * rho
    update[x] = 0.0
    update[x, x] = 1.0 - eta * h - a - a  # -a from x itself, -a from l_i' = ... - x_i
    update[x, lam] = a
    update[x, c] = a + a  # from c and from l_i' = ... + c
    center = np.eye(n)
    center[c] = 0.0
    center[c, :p] = 1.0 / p
    center[c, p:2 * p] = -1.0 / p
    return center @ update


def cycle(turns: list[np.ndarray]) -> np.ndarray:
    m = np.eye(turns[0].shape[0])
    for t in turns:
        m = t @ m
    return m


def spectral_radius(m: np.ndarray) -> float:
    return float(np.max(np.abs(np.linalg.eigvals(m))))


def easgd_radius(p: int, eta_h: float, alpha: float) -> float:
    """Spectral radius of one round-robin cycle of EASGD."""
    return spectral_radius(cycle([easgd_turn(p, i, eta_h, alpha) for i in range(p)]))


def admm_radius(p: int, eta: float, h: float, rho: float) -> float:
    """Spectral radius of one round-robin cycle of ADMM."""
    return spectral_radius(cycle([admm_turn(p, i, eta, h, rho) for i in range(p)]))


def easgd_alpha_bound(eta_h: np.ndarray | float) -> np.ndarray | float:
    """The largest stable moving rate, (4 - 2 eta h) / (4 - eta h), for 0 <= eta h <= 2."""
    return (4.0 - 2.0 * np.asarray(eta_h)) / (4.0 - np.asarray(eta_h))


def easgd_stable(eta_h: float, alpha: float) -> bool:
    """The analytic condition."""
    return 0.0 <= eta_h <= 2.0 and 0.0 <= alpha <= float(easgd_alpha_bound(eta_h))


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Round-robin stability of EASGD and ADMM on "
                                     "f(x) = h x^2 / 2 (Zhang et al. 2015, section 4).")
    parser.add_argument("--p", type=int, default=3, help="workers (default 3)")
    parser.add_argument("--eta", type=float, default=0.001, help="learning rate")
    parser.add_argument("--h", type=float, default=1.0, help="curvature of the quadratic")
    parser.add_argument("--alpha", type=float, default=0.5, help="EASGD moving rate")
    parser.add_argument("--rho", type=float, default=2.5, help="ADMM penalty")
    parser.add_argument("--out", type=Path, default=Path("stability"),
                        help="folder for the PNG maps (default ./stability)")
    parser.add_argument("--no-plots", action="store_true", help="print the radii only")
    args = parser.parse_args(argv)
    if args.p < 1:
        parser.error(f"--p must be at least 1, got {args.p}")
    for name in ("eta", "h", "alpha", "rho"):
        if not np.isfinite(getattr(args, name)):
            parser.error(f"--{name} must be finite")

    eta_h = args.eta * args.h
    r_easgd = easgd_radius(args.p, eta_h, args.alpha)
    r_admm = admm_radius(args.p, args.eta, args.h, args.rho)
    bound = easgd_alpha_bound(eta_h) if 0 <= eta_h <= 2 else float("nan")
    verdict = lambda r: "stable" if r <= 1 + 1e-12 else "UNSTABLE"  # noqa: E731
    print(f"p = {args.p}, eta = {args.eta:g}, h = {args.h:g} (eta h = {eta_h:g})")
    print(f"EASGD alpha = {args.alpha:g}: spectral radius {r_easgd:.9f} ({verdict(r_easgd)}); "
          f"analytic bound alpha <= {bound:.6g}, "
          f"{'inside' if easgd_stable(eta_h, args.alpha) else 'outside'} the stable region")
    print(f"ADMM  rho = {args.rho:g}: spectral radius {r_admm:.9f} ({verdict(r_admm)})")
    if not args.no_plots:
        args.out.mkdir(parents=True, exist_ok=True)
        plot_easgd(args.p, args.out / f"easgd_p{args.p}.png")
        plot_admm(args.p, args.h, args.out / f"admm_p{args.p}.png")
        print(f"wrote {args.out / f'easgd_p{args.p}.png'} and {args.out / f'admm_p{args.p}.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
