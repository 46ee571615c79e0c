"""Run ``umm.train.loop.train`` on a saved run config (the tests' subprocess entry; prints the result)."""
import json
import sys

import torch
from omegaconf import OmegaConf

from umm.config.schema import RootConfig
from umm.train.loop import train

if __name__ == "__main__":
    torch.set_num_threads(1)
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(RootConfig), OmegaConf.load(sys.argv[1])))
    print("RESULT " + json.dumps(train(cfg)), flush=True)
