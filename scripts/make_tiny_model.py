"""Build the tiny BAGEL model dir (configs, tokenizer, trained autoencoder, random Bagel weights).

    python scripts/make_tiny_model.py --out artifacts/models/tiny

Dims come from conf/model/tiny.yaml. Does nothing when the dir is already complete.
"""
from __future__ import annotations

import argparse
import os

# Idle OpenMP threads sleep instead of spinning: on a shared or busy CPU, spinning made the AE
# training 4x slower (measured). Must be set before torch loads its OpenMP runtime.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from umm.model.tiny import build_tiny_model_dir, tiny_model_config  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_out = os.path.join(os.environ.get("UMM_MODEL_CACHE", "artifacts/models"), "tiny")
    parser.add_argument("--out", default=default_out, help=f"model dir to write (default {default_out})")
    parser.add_argument("--seed", type=int, default=0, help="seed of the Bagel's random init")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1), help="CPU threads for AE training")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    # flush: the build takes minutes and its progress often goes to a log file.
    build_tiny_model_dir(args.out, tiny_model_config(), seed=args.seed, log=lambda msg: print(msg, flush=True))


if __name__ == "__main__":
    main()
