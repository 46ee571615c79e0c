"""Typed schema of the resolved experiment config.

Every YAML group under ``conf/`` is checked against these dataclasses before anything runs
(see ``umm.config.validate``). Workers read ``resolved.yaml`` back into the same classes with
plain OmegaConf (``umm.config.load_resolved``), so the launcher and the trainer agree on one
contract. Free-form nodes (where ``+key=`` is allowed) are the ``Dict[str, Any]`` fields.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from omegaconf import MISSING

from umm.config.dims import LLMDims, ViTDims


@dataclass
class TorchrunConfig:
    """Fields named exactly as torchrun's flags (``--nnodes`` ...)."""

    nnodes: int = 1
    nproc_per_node: int = 1
    node_rank: int = 0
    # Single node: --standalone picks a free port itself, so parallel runs never clash.
    standalone: bool = True
    rdzv_backend: str = "c10d"
    rdzv_endpoint: Optional[str] = None
    rdzv_id: Optional[str] = None
    max_restarts: int = 0
    extra_args: List[str] = field(default_factory=list)


@dataclass
class AEBuildConfig:
    resolution: int = 256
    in_channels: int = 3
    ch: int = 128
    out_ch: int = 3
    ch_mult: List[int] = field(default_factory=lambda: [1, 2, 4, 4])
    num_res_blocks: int = 2
    z_channels: int = 16
    scale_factor: float = 0.3611
    shift_factor: float = 0.1159


@dataclass
class ModelConfig:
    name: str = MISSING
    # BAGEL model dir: llm_config.json, vit_config.json, ae.safetensors, ema.safetensors, tokenizer.
    path: str = MISSING
    # Build from the dims below instead of reading weights (benchmarks, make-tiny script).
    llm: LLMDims = field(default_factory=LLMDims)
    vit: ViTDims = field(default_factory=ViTDims)
    ae: AEBuildConfig = field(default_factory=AEBuildConfig)
    # Cut the LLM to this many layers (benchmarks); null keeps all.
    num_layers: Optional[int] = None
    latent_patch_size: int = 2
    max_latent_size: int = 64
    vit_max_num_patch_per_side: int = 70
    vit_select_layer: int = -2
    timestep_shift: float = 1.0
    connector_act: str = "gelu_pytorch_tanh"
    # Load weights from ema.safetensors (the release ships only EMA) or model.safetensors.
    weights: str = "ema"


@dataclass
class LoraConfig:
    enabled: bool = False
    r: int = 256
    alpha: int = 512
    dropout: float = 0.0
    target_modules: List[str] = field(default_factory=list)


@dataclass
class MethodConfig:
    """One recipe (umm/methods/<recipe>.py) and its knobs."""

    name: str = MISSING  # option name: sft, irg_stage1, irg_stage2, reca, unicot
    recipe: str = MISSING  # recipe module: sft, irg, reca, unicot
    stage: Optional[str] = None  # IRG: stage1 / stage2 (also the sweep subdir)
    ce_weight: float = 1.0
    mse_weight: float = 1.0
    ce_loss_reweighting: bool = False
    # Parts that train; everything else is frozen (no grad, no optimizer state).
    # Part names: llm_und, llm_gen, embed, lm_head, vit, connector, gen_heads
    trainable: List[str] = field(default_factory=list)
    text_cond_dropout_prob: float = 0.1
    vit_cond_dropout_prob: float = 0.3
    vae_cond_dropout_prob: float = 0.3
    lora: LoraConfig = field(default_factory=LoraConfig)
    # recA: one fixed text after the image's own ViT tokens; null: one drawn per sample from
    # templates_file (a text file, one template a line; null: umm/methods/reca_templates.txt).
    template_prompt: Optional[str] = None
    templates_file: Optional[str] = None
    # Upstream's --freeze_und: the understanding tokens' activations (embeddings, Q/K/V, attention and
    # MLP outputs, final norm) are detached inside the forward, so no gradient passes through them.
    freeze_und: bool = False
    # UniCoT `unicot` chains: CE on plan, edit, summary, evaluation and final texts (the paper's loss
    # figure). Off: as upstream's released MDP builders, no text of a chain has loss.
    chain_text_loss: bool = False
    # UniCoT: probability that a vlm row's think turn is left out (else it trains as a gpt turn).
    think_drop: float = 0.0
    # Initialise the weights from another run's checkpoints dir (latest complete) or a checkpoint.
    init_from: Optional[str] = None
    init_from_ema: bool = True


@dataclass
class ImageTransformConfig:
    stride: int = 16
    min_size: int = 256
    max_size: int = 512
    # Cap on width x height (divided by the number of images of a VLM row), as upstream's
    # max_pixels; null: no cap.
    max_pixels: Optional[int] = None


@dataclass
class DatasetConfig:
    # t2i | images | edit | interleaved | vlm | irg | unicot | mdp_t2i | mdp_edit | mdp_geo
    kind: str = MISSING
    # Relative to data.root: a JSONL file, a parquet file or folder of them, a tar shard or folder
    # of them, or a folder of images (docs/DATA.md).
    path: str = MISSING
    weight: float = 1.0
    is_mandatory: bool = False
    num_used: Optional[int] = None
    # vlm rows: the folder image paths are relative to (upstream's data_dir), relative to
    # data.root; null: the JSONL file's folder.
    image_dir: Optional[str] = None
    # This dataset's own image transforms (upstream sets them per dataset group); null: data's.
    vae_transform: Optional[ImageTransformConfig] = None
    vit_transform: Optional[ImageTransformConfig] = None


@dataclass
class DataConfig:
    name: str = MISSING
    root: str = MISSING
    # A YAML file of data keys (its datasets replace these; root defaults to its folder):
    # umm/config/userdata.py.
    file: Optional[str] = None
    # Build the synthetic set under root if it is absent (tiny model only).
    synthesize: bool = False
    datasets: Dict[str, DatasetConfig] = field(default_factory=dict)
    expected_num_tokens: int = 10240
    max_num_tokens: int = 11520
    max_num_tokens_per_sample: int = 10240
    prefer_buffer_before: int = 8192
    max_buffer_size: int = 50
    num_workers: int = 0
    seed: int = 42
    vae_transform: ImageTransformConfig = field(default_factory=ImageTransformConfig)
    vit_transform: ImageTransformConfig = field(
        default_factory=lambda: ImageTransformConfig(stride=14, min_size=224, max_size=980)
    )
    on_error: str = "raise"  # raise | skip
    # Reject images the transforms would scale up or down by more than this factor.
    max_resize_factor: float = 8.0
    max_skip_fraction: float = 0.01
    allow_outside_root: bool = False
    # Pictures with more pixels are refused from their header, before decoding (umm/data/images.py).
    # 8192 px a side is as far as data.max_resize_factor=8 lets a picture shrink to upstream's 1024 px;
    # a 16-bit or float picture this large decodes in well under 1 GB.
    max_image_pixels: int = 8192 * 8192


@dataclass
class OptimConfig:
    lr: float = 2e-5
    min_lr: float = 1e-7
    betas: List[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-15
    weight_decay: float = 0.0
    warmup_steps: int = 0
    schedule: str = "constant"  # constant | cosine
    max_grad_norm: float = 1.0
    fused: bool = True  # fused AdamW on CUDA; ignored on CPU


@dataclass
class TrainConfig:
    max_steps: int = 1000
    grad_accum: int = 1
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "bf16"  # bf16 (fp32 master, bf16 compute) | fp32
    master_weights: str = "auto"  # auto | params | optimizer: where bf16 compute keeps the fp32 weights
    attn_backend: str = "auto"  # auto | sdpa | flex
    # true/full (every block) | every2 (every other LLM block) | false/none | a share of the LLM's blocks in
    # [0, 1] | auto (memory plan); the ViT's blocks all recompute once any LLM block does
    activation_checkpointing: Any = True
    compile: Any = "auto"  # auto (on CUDA, not on CPU) | true | false: torch.compile of each block
    # Inductor's kernel cache when compiling (conf/train/default.yaml: under output_root, so a resume
    # or the next run reuses it); null: torch's default, or TORCHINDUCTOR_CACHE_DIR when set.
    compile_cache_dir: Optional[str] = None
    # torch._inductor.config settings for what compiles (dotted keys, e.g. triton.autotune_pointwise:
    # false); a key this torch lacks stops the run at its start.
    inductor_options: Dict[str, Any] = field(default_factory=dict)
    # null: keep no EMA (upstream's LoRA trainers keep none); checkpoints then hold no ema.safetensors.
    ema_decay: Optional[float] = 0.9999
    ema_on_cpu: bool = False
    gpu_memory_gib: Optional[float] = None  # the memory plan's GPU size; null: what CUDA sees
    seed: int = 4396
    save_every: int = 500
    keep_last: int = 3
    # Consolidated model/ema.safetensors are written at the end of a run (completed or stopped) and,
    # when > 0, every export_every steps; other checkpoints hold only the resume shards.
    export_every: int = 0
    # false: a completed run writes no end checkpoint, only save_every's (conf/train/default.yaml).
    save_at_end: bool = True
    # Write checkpoints that are not consolidated in a background thread (conf/train/default.yaml).
    async_save: bool = False
    log_every: int = 10
    # A torch.profiler record of steps profile_at .. profile_at + profile_steps - 1 in <run_dir>/profile
    # (umm/train/step_profiler.py); null: none.
    profile_at: Optional[int] = None
    profile_steps: int = 2
    sample_every: int = 0  # 0: only at the end
    # At most this many samples per grid; 0 turns sampling off.
    num_sample_prompts: int = 8
    # null: rows of the run's datasets; or a list of prompts / edits / questions, or a .jsonl/.yaml
    # file of them (umm/train/sample_prompts.py).
    sample_prompts: Any = None
    sample_steps: int = 25
    cfg_text_scale: float = 4.0
    # Shift of the samples' timestep schedule (upstream's inference scripts use 3.0 whatever the
    # training shift, model.timestep_shift).
    sample_timestep_shift: float = 3.0
    grace_period_s: float = 60.0
    max_bad_steps: int = 0
    resume: bool = True
    # Resume with a config that changes what is trained (umm/config/drift.py); otherwise refused.
    allow_config_change: bool = False

    def masters_fit_optimizer(self) -> bool:
        """Whether the fp32 master weights can live in the optimizer (``master_weights``): bf16
        compute, and no gradient accumulation (bf16 gradients would add up in bf16)."""
        return self.precision == "bf16" and self.grad_accum == 1


@dataclass
class LoggerConfig:
    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str = "umm"
    progress_bar: bool = True


@dataclass
class SlurmConfig:
    """sbatch-level settings for ``launcher=slurm`` (Hydra's submitit launcher reads them)."""

    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    timeout_min: int = 60
    gpus_per_node: int = 8
    cpus_per_task: int = 16
    mem_gb: Optional[int] = None
    # Any other #SBATCH option, e.g. {constraint: h100, exclusive: true}.
    additional_parameters: Dict[str, Any] = field(default_factory=dict)


@dataclass
class LauncherConfig:
    name: str = "local"  # local | slurm | external
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    # external: a third-party script, the seed's way.
    entrypoint: str = "python"  # torchrun | python | bash
    cwd: Optional[str] = None
    script: Optional[str] = None
    env: Dict[str, str] = field(default_factory=dict)
    args: Dict[str, Any] = field(default_factory=dict)


@dataclass
class PipelineConfig:
    name: str = MISSING  # bagel | irg | recA | unicot


@dataclass
class RootConfig:
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    torchrun: TorchrunConfig = field(default_factory=TorchrunConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    run_name: str = "default"
    output_root: str = "outputs"
    run_dir: str = MISSING
    dry_run: bool = False
