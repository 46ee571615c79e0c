"""The tests' reference for a sharded model's weights: torch's own gathered state dict (not umm's
streaming gathers, which the tests compare against it)."""
from typing import Dict

import torch

from umm.train.distributed import DistEnv


def full_model_state(model: torch.nn.Module, env: DistEnv) -> Dict[str, torch.Tensor]:
    """Every tensor of the model, whole, on CPU (rank 0 only under FSDP2; a collective there)."""
    if env.distributed:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().to("cpu") for k, v in model.state_dict().items()}
