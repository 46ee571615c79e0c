"""torchrun (or plain) worker of test_world_size_resume: ``resume_worker.py CONFIG OUT``.

Resumes the run of CONFIG's newest checkpoint and dumps what it loaded (``OUT/loaded.safetensors``),
trains on to ``train.max_steps``, then resumes the checkpoint it wrote last on this same world size
and dumps that (``OUT/saved.safetensors``): whole weights, EMA and AdamW moments, gathered to rank 0.
"""
import sys
from pathlib import Path

import torch

from umm.config import load_resolved
from umm.train import distributed as D
from umm.train.checkpoint import write_safetensors
from umm.train.loop import Trainer, train
from umm.train.worker import exit_now

from tests.train.gathered import full_model_state


def dump(cfg, env, path: Path) -> None:
    trainer = Trainer(cfg, env)
    trainer._build()
    out = {f"model/{k}": v for k, v in full_model_state(trainer.model, env).items()}
    out.update({f"ema/{k}": v for k, v in trainer.ema.full_state().items()})
    for p, state in trainer.optimizer.state.items():
        for field, value in state.items():
            out[f"optim/{trainer.param_names[id(p)]}.{field}"] = D.full(value.detach()).to("cpu")
    out["step"] = torch.tensor(trainer.step)
    trainer.loader.close()
    if env.is_main:
        write_safetensors(out, path)


def main():
    cfg, out = load_resolved(Path(sys.argv[1])), Path(sys.argv[2])
    env = D.setup("cpu")
    if (Path(cfg.run_dir) / "checkpoints").is_dir():
        dump(cfg, env, out / "loaded.safetensors")
    result = train(cfg)
    dump(cfg, env, out / "saved.safetensors")
    if env.is_main:
        print("RESULT", result, flush=True)
    D.teardown(env)


if __name__ == "__main__":
    main()
    exit_now(0)
