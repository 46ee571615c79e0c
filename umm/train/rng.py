"""Random streams, designed so a resumed run repeats an uninterrupted one exactly.

The trainer's own draws (flow noise, the autoencoder's posterior sample) come from a generator
seeded by (seed, rank, step, micro-step), so they depend on where the run is, not on what ran
before. The data stream owns its randomness and saves its position (``loader.state_dict()``). The
global torch / CUDA / Python / NumPy states are still saved per rank and restored, for any code
that draws from them.
"""
from __future__ import annotations

import random
from typing import Dict, Tuple

import numpy as np
import torch


def process_seed(seed: int, rank: int, world_size: int) -> int:
    """Upstream's per-rank seed: global_seed * world_size + rank."""
    return seed * world_size + rank


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def step_generator(seed: int, rank: int, step: int, micro: int, device: torch.device) -> torch.Generator:
    # Distinct large odd multipliers keep (rank, step, micro) triples from colliding.
    mixed = (seed * 1_000_003 + rank * 7_919 + step * 104_729 + micro * 15_485_863) % (2**63 - 1)
    gen = torch.Generator(device=device)
    gen.manual_seed(mixed)
    return gen


def capture() -> dict:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {
            "kind": np_state[0],
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def to_saved(state: dict) -> Tuple[Dict[str, torch.Tensor], dict]:
    """A ``capture()`` as tensors and JSON-able values (checkpoints hold no pickles)."""
    version, internal, gauss = state["python"]
    tensors = {"torch": state["torch"], "python": torch.tensor(internal, dtype=torch.int64),
               "numpy_keys": state["numpy"]["keys"]}
    tensors.update({f"cuda.{i}": s for i, s in enumerate(state.get("cuda", []))})
    numpy = {k: v for k, v in state["numpy"].items() if k != "keys"}
    return tensors, {"python_version": version, "python_gauss": gauss, "numpy": numpy}


def from_saved(tensors: Dict[str, torch.Tensor], values: dict) -> dict:
    """Inverse of :func:`to_saved`."""
    state = {"torch": tensors["torch"],
             "python": (values["python_version"], tuple(int(x) for x in tensors["python"].tolist()),
                        values["python_gauss"]),
             "numpy": {**values["numpy"], "keys": tensors["numpy_keys"]}}
    cuda = sorted((int(k.split(".")[1]), v) for k, v in tensors.items() if k.startswith("cuda."))
    if cuda:
        state["cuda"] = [v for _, v in cuda]
    return state
