"""`pipeline=<recipe> model=bagel_7b_mot` resolves to the settings of that recipe's released run
scripts. The table is written from upstream's files (reference/methods.md, reference/bagel.md name
the commits), not from our configs: each entry cites where its value comes from."""
import subprocess
import sys

import pytest
import yaml

from umm.config import validate
from umm.methods import get_recipe

from .helpers import REPO
from .test_compose import compose_root

BAGEL = "ByteDance-Seed/Bagel@dbeaabb"
RECA = "HorizonWind2004/reconstruction-alignment@b250aa1"
IRG = "Osilly/Interleaving-Reasoning-Generation@3eee315"
UNICOT = "GlacierEQ/unicot@3fcce79 (UniCoT's LoRA tree)"
ALL_BUT_VAE = sorted(["connector", "embed", "gen_heads", "lm_head", "llm_gen", "llm_und", "vit"])
INTENDED = ["q_proj", "v_proj", "q_proj_moe_gen", "v_proj_moe_gen", "gate_proj", "up_proj", "down_proj"]

# pipeline (+ method) -> {config key: (upstream value, where upstream sets it)}
UPSTREAM = {
    ("bagel", None): {
        "optim.lr": (2e-5, f"{BAGEL} TRAIN.md fine-tuning command --lr 2e-5"),
        "optim.warmup_steps": (2000, f"{BAGEL} train/pretrain_unified_navit.py TrainingArguments.warmup_steps"),
        "optim.schedule": ("constant", f"{BAGEL} train/pretrain_unified_navit.py lr_scheduler"),
        "train.ema_decay": (0.9999, f"{BAGEL} train/pretrain_unified_navit.py TrainingArguments.ema"),
        "train.save_every": (2000, f"{BAGEL} train/pretrain_unified_navit.py TrainingArguments.save_every "
                                   "(TRAIN.md sets none)"),
        "data.expected_num_tokens": (10240, f"{BAGEL} TRAIN.md --expected_num_tokens 10240"),
        "data.max_num_tokens": (11520, f"{BAGEL} TRAIN.md --max_num_tokens 11520"),
        "data.max_num_tokens_per_sample": (10240, f"{BAGEL} TRAIN.md --max_num_tokens_per_sample 10240"),
        "data.vae_transform.min_size": (512, f"{BAGEL} data/configs/example.yaml image_transform_args"),
        "data.vae_transform.max_size": (1024, f"{BAGEL} data/configs/example.yaml image_transform_args"),
        "model.timestep_shift": (1.0, f"{BAGEL} train/pretrain_unified_navit.py timestep_shift default"),
        "model.max_latent_size": (64, f"{BAGEL} TRAIN.md --max_latent_size 64"),
        "method.text_cond_dropout_prob": (0.1, f"{BAGEL} ModelArguments.text_cond_dropout_prob"),
        "method.vit_cond_dropout_prob": (0.3, f"{BAGEL} ModelArguments.vit_cond_dropout_prob"),
        "method.vae_cond_dropout_prob": (0.3, f"{BAGEL} ModelArguments.vae_cond_dropout_prob"),
        "trainable parts": (ALL_BUT_VAE, f"{BAGEL} TRAIN.md: only --freeze_vae (default True)"),
        "method.lora.enabled": (False, f"{BAGEL} trains no adapters"),
    },
    ("recA", None): {
        "optim.lr": (4e-5, f"{RECA} BAGEL/README.md --lr 0.00004"),
        "optim.warmup_steps": (1000, f"{RECA} BAGEL/train/pretrain_unified_navit.py warmup_steps default"),
        "optim.schedule": ("constant", f"{RECA} BAGEL/train/pretrain_unified_navit.py lr_scheduler"),
        "train.ema_decay": (0.9999, f"{RECA} BAGEL/train/pretrain_unified_navit.py ema default"),
        "train.save_every": (250, f"{RECA} BAGEL/train/pretrain_unified_navit.py save_every default"),
        "data.expected_num_tokens": (32768, f"{RECA} BAGEL/train/pretrain_unified_navit.py default"),
        "data.max_num_tokens": (36864, f"{RECA} BAGEL/train/pretrain_unified_navit.py default"),
        "data.max_num_tokens_per_sample": (16384, f"{RECA} BAGEL/train/pretrain_unified_navit.py default"),
        "data.vae_transform.min_size": (512, f"{RECA} BAGEL/data/configs/example.yaml image_transform_args"),
        "data.vae_transform.max_size": (1024, f"{RECA} BAGEL/data/configs/example.yaml image_transform_args"),
        "data.vit_transform.min_size": (224, f"{RECA} BAGEL/data/configs/example.yaml vit_image_transform_args"),
        "data.vit_transform.max_size": (224, f"{RECA} BAGEL/data/configs/example.yaml vit_image_transform_args"),
        "model.timestep_shift": (1.0, f"{RECA} README command sets no --timestep_shift"),
        "model.max_latent_size": (64, f"{RECA} BAGEL/README.md --max_latent_size 64"),
        "method.text_cond_dropout_prob": (0.1, f"{RECA} ModelArguments default (template text)"),
        "method.vit_cond_dropout_prob": (0.3, f"{RECA} ModelArguments default"),
        "method.vae_cond_dropout_prob": (0.3, f"{RECA} ModelArguments default"),
        "trainable parts": (["gen_heads", "llm_gen"],
                             f"{RECA} README --freeze_vae/--freeze_vit/--freeze_und True; connector frozen"),
        "method.freeze_und": (True, f"{RECA} BAGEL/README.md --freeze_und True"),
        "method.lora.enabled": (False, f"{RECA} trains no adapters"),
    },
    ("irg", "irg_stage1"): {
        "optim.lr": (2e-5, f"{IRG} SFT/run/train_toy_dataset_stage1/run.sh --lr 2e-5"),
        "optim.warmup_steps": (500, f"{IRG} SFT/run/train_toy_dataset_stage1/run.sh --warmup_steps 500"),
        "optim.schedule": ("constant", f"{IRG} SFT/train/pretrain_unified_navit.py lr_scheduler"),
        "train.ema_decay": (0.995, f"{IRG} SFT/run/train_toy_dataset_stage1/run.sh --ema 0.995"),
        "train.save_every": (1000, f"{IRG} SFT/run/train_toy_dataset_stage1/run.sh --save_every 1000"),
        "data.expected_num_tokens": (40000, f"{IRG} SFT/run/train_toy_dataset_stage1/run.sh"),
        "data.max_num_tokens": (40000, f"{IRG} SFT/run/train_toy_dataset_stage1/run.sh"),
        "data.max_num_tokens_per_sample": (32768, f"{IRG} SFT/run/train_toy_dataset_stage1/run.sh"),
        "data.vae_transform.min_size": (512, f"{IRG} SFT/data/configs/train_toy_dataset_stage1.yaml"),
        "data.vae_transform.max_size": (1024, f"{IRG} SFT/data/configs/train_toy_dataset_stage1.yaml"),
        "data.vit_transform.min_size": (378, f"{IRG} SFT/data/configs/train_toy_dataset_stage1.yaml"),
        "data.vit_transform.max_size": (980, f"{IRG} SFT/data/configs/train_toy_dataset_stage1.yaml"),
        "model.timestep_shift": (4.0, f"{IRG} SFT/run/train_toy_dataset_stage1/run.sh --timestep_shift 4"),
        "model.max_latent_size": (64, f"{IRG} SFT/run/train_toy_dataset_stage1/run.sh --max_latent_size 64"),
        "method.text_cond_dropout_prob": (0.0, f"{IRG} SFT/run/train_toy_dataset_stage1/run.sh"),
        "method.vit_cond_dropout_prob": (0.0, f"{IRG} SFT/run/train_toy_dataset_stage1/run.sh"),
        "method.vae_cond_dropout_prob": (0.3, f"{IRG} run.sh leaves the ModelArguments default"),
        "trainable parts": (ALL_BUT_VAE, f"{IRG} run.sh sets no freeze flag but the default freeze_vae"),
        "method.lora.enabled": (False, f"{IRG} full fine-tune"),
        "method.init_from": (None, f"{IRG} stage 1 starts from BAGEL-7B-MoT (--resume_from model_path)"),
    },
    ("irg", "irg_stage2"): {
        "optim.lr": (2e-5, f"{IRG} SFT/run/train_toy_dataset_stage2/run.sh --lr 2e-5"),
        "optim.warmup_steps": (0, f"{IRG} SFT/run/train_toy_dataset_stage2/run.sh --warmup_steps 0"),
        "train.ema_decay": (0.995, f"{IRG} SFT/run/train_toy_dataset_stage2/run.sh --ema 0.995"),
        "train.save_every": (1000, f"{IRG} SFT/run/train_toy_dataset_stage2/run.sh --save_every 1000"),
        "data.expected_num_tokens": (40000, f"{IRG} SFT/run/train_toy_dataset_stage2/run.sh"),
        "data.max_num_tokens_per_sample": (32768, f"{IRG} SFT/run/train_toy_dataset_stage2/run.sh"),
        "model.timestep_shift": (4.0, f"{IRG} SFT/run/train_toy_dataset_stage2/run.sh --timestep_shift 4"),
        "method.vae_cond_dropout_prob": (0.3, f"{IRG} run.sh leaves the ModelArguments default"),
        "method.init_from": ("outputs/default/stage1/checkpoints",
                             f"{IRG} stage-2 run.sh: resume_from = a stage-1 checkpoint dir"),
        "method.init_from_ema": (True, f"{IRG} stage-2 run.sh --finetune_from_ema True"),
    },
    ("unicot", None): {
        "optim.lr": (2e-5, f"{UNICOT} scripts/train_lora.sh --lr 2e-5"),
        "optim.warmup_steps": (200, f"{UNICOT} scripts/train_lora.sh --warmup_steps 200"),
        "optim.schedule": ("constant", f"{UNICOT} train/pretrain_unified_navit_lora.py lr_scheduler"),
        "train.ema_decay": (None, f"{UNICOT} train/pretrain_unified_navit_lora.py: no fsdp_ema_update, "
                                  "fsdp_save_ckpt(ema_model=None)"),
        "train.save_every": (200, f"{UNICOT} scripts/train_lora.sh --save_every 200"),
        "data.expected_num_tokens": (49152, f"{UNICOT} scripts/train_lora.sh"),
        "data.max_num_tokens": (52224, f"{UNICOT} scripts/train_lora.sh"),
        "data.max_num_tokens_per_sample": (16384, f"{UNICOT} scripts/train_lora.sh"),
        "data.vae_transform.min_size": (512, f"{UNICOT} data/configs/example.yaml"),
        "data.vae_transform.max_size": (1024, f"{UNICOT} data/configs/example.yaml"),
        "model.timestep_shift": (1.0, f"{UNICOT} scripts/train_lora.sh sets no --timestep_shift"),
        "method.text_cond_dropout_prob": (0.0, f"{UNICOT} scripts/train_lora.sh"),
        "method.vit_cond_dropout_prob": (0.0, f"{UNICOT} scripts/train_lora.sh"),
        "method.vae_cond_dropout_prob": (0.0, f"{UNICOT} scripts/train_lora.sh"),
        "method.lora.enabled": (True, f"{UNICOT} train/pretrain_unified_navit_lora.py"),
        "trainable parts": ([], f"{UNICOT} pretrain_unified_navit_lora.py: every base weight frozen"),
        "method.lora.r": (256, f"{UNICOT} scripts/train_lora.sh --lora_rank 256"),
        "method.lora.alpha": (512, f"{UNICOT} scripts/train_lora.sh --lora_alpha 512"),
        "method.lora.dropout": (0.0, f"{UNICOT} LoraConfig without lora_dropout (peft default 0)"),
        "method.lora.target_modules": (INTENDED, f"{UNICOT} pretrain_unified_navit_lora.py default list, "
                                                 "comma restored"),
        "method.chain_text_loss": (False, f"{UNICOT} data/interleave_datasets/mdp_dataset.py: no text loss"),
    },
    ("unicot", "unicot_released_targets"): {
        "method.lora.target_modules": (["q_proj", "v_proj", "q_proj_moe_gen", "up_proj", "down_proj"],
                                       f"{UNICOT} pretrain_unified_navit_lora.py default list as parsed"),
    },
}


def _get(obj, key):
    if key == "trainable parts":  # what the recipe trains ([] in the config = the recipe's default)
        return sorted(get_recipe(obj.method).trainable_parts())
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


@pytest.mark.parametrize("pipeline,method", list(UPSTREAM), ids=lambda v: str(v))
def test_recipe_resolves_to_upstream_settings(pipeline, method):
    overrides = [f"pipeline={pipeline}", "model=bagel_7b_mot", "output_root=outputs"]
    if method:
        overrides.append(f"method={method}")
    cfg = validate(compose_root(overrides))
    wrong = {}
    for key, (value, source) in UPSTREAM[(pipeline, method)].items():
        got = _get(cfg, key)
        if got != value:
            wrong[key] = f"{got!r}, upstream {value!r} ({source})"
    assert not wrong, wrong


def test_irg_dry_run_prints_upstream_settings(tmp_path):
    """The command of the issue: both stages' resolved configs carry the run.sh values."""
    env = {"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0"}
    out = subprocess.run([sys.executable, "-m", "umm", "pipeline=irg", "model=bagel_7b_mot", "dry_run=true",
                          f"output_root={tmp_path}"], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    blocks = out.stdout.split("# resolved config")[1:]
    assert len(blocks) == 2
    stages = []
    for block in blocks:
        text = block.split("\n", 1)[1]
        text = text[: text.index("\n# ")] if "\n# " in text else text
        stages.append(yaml.safe_load(text))
    for stage, warmup in zip(stages, (500, 0)):
        assert stage["model"]["timestep_shift"] == 4.0 and stage["train"]["ema_decay"] == 0.995
        assert stage["optim"]["lr"] == 2e-5 and stage["optim"]["warmup_steps"] == warmup
        assert (stage["data"]["expected_num_tokens"], stage["data"]["max_num_tokens"],
                stage["data"]["max_num_tokens_per_sample"]) == (40000, 40000, 32768)
