"""python -m easgd_ext.centers {list,sweep,remove}: this user's shared-memory centers.

    list                      every center in /dev/shm: size, creator, workers, in use or not
                              (a corrupt one is listed as such, with what is wrong)
    sweep                     remove the centers nobody uses any more (left by crashed runs)
    sweep --include-persistent  ... persistent ones too (kept for restarts until removed)
    sweep --include-corrupt   ... corrupt ones too (kept until asked: nobody can use them)
    remove NAME [NAME ...]    remove these, in use or not (processes using them keep working)
"""

from __future__ import annotations

import argparse
import sys
import time

from ..shared_center import SharedCenter


def _age(unix_ns: int) -> str:
    seconds = max(0.0, time.time() - unix_ns / 1e9)
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.0f} s"


def print_list(centers: list[dict]) -> None:
    if not centers:
        print("no easgd_ext shared centers of this user in /dev/shm")
        return
    print(f"{'name':<40}{'MB':>9}  {'state':<22}{'creator':>10}  {'age':>8}  workers (alive/registered)")
    for c in centers:
        if c.get("corrupt"):
            print(f"{c['name']:<40}{c['total_bytes'] / 2**20:>9.1f}  corrupt ({c['corrupt']}); "
                  f"remove it with `python -m easgd_ext.centers remove {c['name']}`")
            continue
        state = "in use" if c["in_use"] else "stale (nobody uses it)"
        if c["persistent"]:
            state = ("persistent, in use" if c["in_use"] else "persistent, idle")
        alive = sum(w["alive"] and w["state"] == "active" for w in c["workers"])
        print(f"{c['name']:<40}{c['total_bytes'] / 2**20:>9.1f}  {state:<22}{c['creator_pid']:>10}  "
              f"{_age(c['created_unix_ns']):>8}  {alive}/{len(c['workers'])}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m easgd_ext.centers",
                                     description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="list this user's centers")
    sweep = sub.add_parser("sweep", help="remove the centers nobody uses any more")
    sweep.add_argument("--include-persistent", action="store_true",
                       help="also idle persistent centers (kept for restarts until removed)")
    sweep.add_argument("--include-corrupt", action="store_true",
                       help="also corrupt centers (listed by `list`; kept until asked)")
    remove = sub.add_parser("remove", help="remove centers by name")
    remove.add_argument("names", nargs="+", metavar="NAME")
    args = parser.parse_args(argv)

    if args.command == "list":
        print_list(SharedCenter.list())
    elif args.command == "sweep":
        removed = SharedCenter.sweep(include_persistent=args.include_persistent,
                                     include_corrupt=args.include_corrupt)
        print(f"removed {len(removed)} center(s){': ' + ', '.join(removed) if removed else ''}")
        kept = [c["name"] for c in SharedCenter.list() if c["corrupt"] and c["name"] not in removed]
        if kept:
            print(f"kept {len(kept)} corrupt center(s): {', '.join(kept)} (see `python -m "
                  "easgd_ext.centers list`; remove them with `python -m easgd_ext.centers remove "
                  "NAME` or `... sweep --include-corrupt`)")
    else:
        try:
            missing = [name for name in args.names if not SharedCenter.remove(name)]
        except (ValueError, PermissionError) as exc:  # a bad name, another user's center
            parser.error(str(exc))
        if missing:
            print(f"no such center: {', '.join(missing)}", file=sys.stderr)
            return 1
        print(f"removed {', '.join(args.names)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
