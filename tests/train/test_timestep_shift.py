"""model.timestep_shift is the shift of the training noise schedule (IRG trains at 4), whatever the
model dir says."""
import torch

from umm.train import distributed as D
from umm.train.loop import Trainer

from .conftest import run_config


def test_model_timestep_shift_sets_the_training_noise_schedule(tmp_path, model_dir, data_root):
    t, x_t = {}, {}
    for shift in (1.0, 4.0):
        cfg = run_config(tmp_path / str(shift), model_dir, data_root, **{"model.timestep_shift": shift})
        trainer = Trainer(cfg, D.setup("cpu"))
        trainer._build()
        batch = next(iter(trainer.loader))
        latent = trainer.ae.encode(batch.padded_images, sample=True, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            out = trainer.model(batch, latent, generator=torch.Generator().manual_seed(0), return_intermediates=True)
        t[shift], x_t[shift] = out.intermediates["packed_timesteps_t"], out.intermediates["packed_latent_noised"]
    # Same data, same draws: a larger shift moves every noise level towards pure noise (t = 1).
    assert t[1.0].shape == t[4.0].shape and t[1.0].numel() > 0
    assert bool((t[4.0] >= t[1.0]).all()) and bool((t[4.0] > t[1.0] + 0.05).any())
    assert not torch.allclose(x_t[1.0], x_t[4.0])  # the model sees noisier latents
