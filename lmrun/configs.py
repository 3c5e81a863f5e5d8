"""The root config schema, its registration in Hydra's ConfigStore, and validation helpers.

Each component's dataclass lives next to its code; this module assembles them into the
schema that ``conf/config.yaml`` is merged onto, so unknown keys and wrong types fail at
compose time. ``validate`` then checks values and combinations the types cannot express.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from lmrun.align.config import (AlignConfig, DPOConfig, ExpertIterationConfig, GRPOConfig, SFTConfig,
                                validate_align)
from lmrun.curation.config import CurateConfig, validate_curate
from lmrun.data.corpora import DataConfig, validate_data
from lmrun.distributed.config import DistributedConfig, validate_distributed
from lmrun.errors import check
from lmrun.eval.config import EvaluateConfig, validate_evaluate
from lmrun.inference.config import GenerateConfig, validate_generate
from lmrun.launch.config import (ClusterConfig, CollectConfig, LaunchConfig, ResourcesConfig, SweepConfig,
                                 validate_launch)
from lmrun.kernels.config import BenchmarkConfig, validate_benchmark
from lmrun.model.config import ModelConfig, validate_model
from lmrun.model.hf import ExportConfig, validate_export
from lmrun.scaling.config import ScalingConfig, validate_scaling
from lmrun.optim.config import OptimizerConfig, ScheduleConfig, validate_optimizer, validate_schedule
from lmrun.tokenizer.config import TokenizerConfig, validate_tokenizer
from lmrun.tracking.logger import LoggerConfig, validate_logger
from lmrun.train.config import TrainConfig, validate_train


@dataclass
class StageConfig:
    """Which stage runs (set by the `stage` group: conf/stage/<name>.yaml)."""

    name: str = "???"
    description: str = ""
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)


@dataclass
class PathsConfig:
    """Where runs and the artifact cache live (relative paths are relative to the cwd)."""

    runs_dir: str = "runs"
    multiruns_dir: str = "multiruns"
    cache_dir: str = "~/.cache/lmrun"


@dataclass
class CacheConfig:
    """Artifact cache behaviour: ``rebuild=true`` rebuilds every artifact this run needs."""

    rebuild: bool = False


@dataclass
class LmrunConfig:
    """The root schema: one field per config group, plus run-wide switches."""

    stage: StageConfig = field(default_factory=StageConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    benchmark: BenchmarkConfig = field(default_factory=BenchmarkConfig)
    curate: CurateConfig = field(default_factory=CurateConfig)
    align: AlignConfig = field(default_factory=AlignConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    expert_iteration: ExpertIterationConfig = field(default_factory=ExpertIterationConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    collect: CollectConfig = field(default_factory=CollectConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    seed: int = 0
    threads: int | None = None
    dry_run: bool = False
    progress: bool = True


_registered = False


def register_configs() -> None:
    """Store the root schema as ``lmrun_schema`` in Hydra's ConfigStore (idempotent)."""
    global _registered
    if _registered:
        return
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="lmrun_schema", node=LmrunConfig)
    register_resolvers()
    _registered = True


def register_resolvers() -> None:
    """OmegaConf resolvers the presets use: ``${lmrun.shape:...}`` (model shapes from a
    parameter count), ``${lmrun.time_budget:...}`` (the default time budget). Idempotent; also run on import of this module, so that a config loaded in a
    Slurm job resolves too."""
    from omegaconf import OmegaConf

    from lmrun.scaling.shapes import shape_resolver

    if not OmegaConf.has_resolver("lmrun.shape"):
        OmegaConf.register_new_resolver("lmrun.shape", shape_resolver)
    if not OmegaConf.has_resolver("lmrun.time_budget"):
        OmegaConf.register_new_resolver("lmrun.time_budget", time_budget_resolver)


def time_budget_resolver(max_steps, max_tokens, max_flops, seconds):
    """``${lmrun.time_budget:${train.max_steps},${train.max_tokens},${train.max_flops},S}``: the
    default ``train.max_time`` — S seconds of training when no other budget is set, else null, so
    that ``train.max_steps=5`` (or max_tokens / max_flops) replaces the default time budget
    without also writing ``train.max_time=null``."""
    return None if any(v is not None for v in (max_steps, max_tokens, max_flops)) else float(seconds)


def check_schema(cfg) -> None:
    """Raise if ``cfg`` (outside ``hydra``) has keys or types the root schema does not allow —
    e.g. keys added with ``+key=value``, which Hydra's own struct check lets through."""
    from omegaconf import OmegaConf

    body = OmegaConf.to_container(cfg, resolve=False)
    body.pop("hydra", None)
    OmegaConf.merge(OmegaConf.structured(LmrunConfig), body)


def validate(cfg) -> None:
    """Check values and combinations of a composed config; raise ConfigError naming the key."""
    check("threads", cfg.threads, cfg.threads is None or cfg.threads >= 1,
          "null (the CPUs this process may use) or an integer >= 1")
    validate_data(cfg.data)
    validate_tokenizer(cfg.tokenizer)
    validate_model(cfg.model)
    validate_optimizer(cfg.optimizer)
    validate_schedule(cfg.schedule)
    validate_train(cfg.train)
    if cfg.train.eval_stride is not None:
        ctx = int(cfg.model.context_length)
        check("train.eval_stride", cfg.train.eval_stride, cfg.train.eval_stride <= ctx,
              f"null or an integer in [1, model.context_length={ctx}]")
    validate_distributed(cfg.distributed, cfg.optimizer.name)
    validate_evaluate(cfg.evaluate, cfg.stage.name)
    validate_generate(cfg.generate, cfg.stage.name)
    validate_export(cfg.export, cfg.stage.name)
    validate_benchmark(cfg.benchmark)
    validate_curate(cfg.curate, cfg.stage.name)
    validate_align(cfg, cfg.stage.name)
    validate_logger(cfg.logger)
    validate_launch(cfg.cluster, cfg.stage.resources, cfg.launch, cfg.collect)
    validate_scaling(cfg.scaling, cfg.stage.name)


register_resolvers()
