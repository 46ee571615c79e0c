"""Write the synthetic coloured-shape datasets (t2i, edit, interleaved, vlm, unicot) for the tiny model.

    python scripts/make_synthetic_data.py --out artifacts/data/synthetic [--size 64] [--seed 0]

A no-op when ``<out>/COMPLETE`` already records the same settings.
"""
from __future__ import annotations

import argparse
import dataclasses
import time

from umm.data.synthetic import SyntheticSettings, generate
from umm.errors import UmmError


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="artifacts/data/synthetic")
    defaults = SyntheticSettings()
    for f in dataclasses.fields(SyntheticSettings):
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=int, default=getattr(defaults, f.name))
    args = parser.parse_args(argv)
    settings = SyntheticSettings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(SyntheticSettings)})
    start = time.time()
    try:
        written = generate(args.out, settings)
    except UmmError as err:  # e.g. --out holds files umm did not make: one line, nothing touched
        raise SystemExit(f"make_synthetic_data: {err}") from None
    print(f"wrote synthetic data to {args.out} in {time.time() - start:.1f}s" if written
          else f"{args.out} is complete; nothing to do")


if __name__ == "__main__":
    main()
