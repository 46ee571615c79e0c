"""Per-node torchrun settings inside a SLURM allocation (one task per node, c10d rendezvous)."""
from __future__ import annotations

import dataclasses
import re
from typing import List, Mapping

from umm.config.schema import RootConfig, TorchrunConfig
from umm.config.validate import ConfigError

RDZV_PORT = 29500
HEAD_PLACEHOLDER = "<first-node-of-SLURM_JOB_NODELIST>"


def expand_nodelist(nodelist: str) -> List[str]:
    """``gpu[001-002,007],cpu1`` -> ``[gpu001, gpu002, gpu007, cpu1]`` (what ``scontrol show hostnames`` prints)."""
    hosts: List[str] = []
    for prefix, ranges, suffix in re.findall(r"([^,\[\]]*)(?:\[([^\]]*)\])?([^,\[\]]*),?", nodelist):
        if not prefix and not ranges:
            continue
        if not ranges:
            hosts.append(prefix + suffix)
            continue
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            for n in range(int(lo), int(hi or lo) + 1):
                hosts.append(f"{prefix}{n:0{len(lo)}d}{suffix}")
    return hosts


def in_allocation(env: Mapping[str, str]) -> bool:
    return "SLURM_JOB_ID" in env and "SLURM_NODEID" in env


def node_torchrun(cfg: RootConfig, env: Mapping[str, str], node_rank: int | None = None) -> TorchrunConfig:
    """This node's torchrun flags: rank from SLURM_NODEID, rendezvous at the allocation's first node.

    ``node_rank`` given (dry runs): that node's flags, with the head host from SLURM_JOB_NODELIST
    when set, else a placeholder.
    """
    t = cfg.torchrun
    if node_rank is None:
        node_rank = int(env["SLURM_NODEID"])
        allocated = int(env.get("SLURM_JOB_NUM_NODES", env.get("SLURM_NNODES", t.nnodes)))
        if allocated != t.nnodes:
            raise ConfigError(
                f"torchrun.nnodes = {t.nnodes} but the SLURM allocation has {allocated} nodes; "
                f"set torchrun.nnodes={allocated} (launcher=slurm asks for torchrun.nnodes nodes)."
            )
    endpoint = t.rdzv_endpoint
    if not endpoint:
        hosts = expand_nodelist(env["SLURM_JOB_NODELIST"]) if env.get("SLURM_JOB_NODELIST") else []
        endpoint = f"{hosts[0] if hosts else HEAD_PLACEHOLDER}:{RDZV_PORT}"
    return dataclasses.replace(
        t, node_rank=node_rank, standalone=t.nnodes == 1 and not t.rdzv_endpoint,
        rdzv_endpoint=endpoint, rdzv_id=env.get("SLURM_JOB_ID") or t.rdzv_id or cfg.run_name,
    )
