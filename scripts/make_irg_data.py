"""Write the synthetic IRG trajectories (prompt → think → first image → reflection → improved image).

    python scripts/make_irg_data.py --out artifacts/data/synthetic_irg [--num 512] [--size 64] [--seed 0]

A no-op when ``<out>/COMPLETE`` already records the same settings.
"""
from __future__ import annotations

import argparse
import time

from umm.data.synthetic_irg import write_irg_dataset
from umm.errors import UmmError


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="artifacts/data/synthetic_irg")
    parser.add_argument("--num", type=int, default=512, help="number of trajectories")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels (the tiny model's)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    start = time.time()
    try:
        write_irg_dataset(args.out, num=args.num, size=args.size, seed=args.seed)
    except UmmError as err:  # e.g. --out holds files umm did not make: one line, nothing touched
        raise SystemExit(f"make_irg_data: {err}") from None
    print(f"IRG trajectories in {args.out} ({time.time() - start:.1f}s)")


if __name__ == "__main__":
    main()
