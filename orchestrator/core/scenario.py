"""The scenario schema: one YAML file describes an experiment (data, tasks, edges, cloud, timeline, serving).

`load_scenario(path)` is the only place that parses YAML (with `yaml.safe_load`); everything downstream
receives the typed `Scenario` or one of its sub-models, never a dict. Field bounds live on the fields,
cross-field rules in `Scenario.check_cross_field_rules`, which collects every problem and names its field.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from orchestrator.core.errors import ScenarioError, UnknownTask

logger = logging.getLogger(__name__)

# The repository root when running from a checkout; the shared data copy lies beside it.
PROJECT_ROOT = Path(__file__).resolve().parents[2]  # orchestrator/core/scenario.py -> the checkout
DEFAULT_DATA_ROOT = PROJECT_ROOT.parent / "shared" / "data" / "celeba"
DATA_ROOT_ENV = "BAIM_DATA_ROOT"

# The 40 attribute names of CelebA's list_attr_celeba.txt, in file order. The procedural fallback uses the
# same names, so a task expression means the same thing on either data source.
CELEBA_ATTRIBUTES: tuple[str, ...] = (
    "5_o_Clock_Shadow", "Arched_Eyebrows", "Attractive", "Bags_Under_Eyes", "Bald", "Bangs", "Big_Lips",
    "Big_Nose", "Black_Hair", "Blond_Hair", "Blurry", "Brown_Hair", "Bushy_Eyebrows", "Chubby", "Double_Chin",
    "Eyeglasses", "Goatee", "Gray_Hair", "Heavy_Makeup", "High_Cheekbones", "Male", "Mouth_Slightly_Open",
    "Mustache", "Narrow_Eyes", "No_Beard", "Oval_Face", "Pale_Skin", "Pointy_Nose", "Receding_Hairline",
    "Rosy_Cheeks", "Sideburns", "Smiling", "Straight_Hair", "Wavy_Hair", "Wearing_Earrings", "Wearing_Hat",
    "Wearing_Lipstick", "Wearing_Necklace", "Wearing_Necktie", "Young",
)  # fmt: skip

NAME_PATTERN = (
    r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"  # task names and edge ids appear in URLs and registry keys
)


# --------------------------------------------------------------------------------------------------------
# Task expressions: a tiny recursive-descent parser for `and`, `or`, `not`, parentheses and attribute names.
# No eval: the grammar is
#   expr := term ("or" term)*;  term := factor ("and" factor)*;  factor := "not" factor | NAME | "(" expr ")"


@dataclass(frozen=True)
class Attr:
    name: str


@dataclass(frozen=True)
class Not:
    operand: TaskExpr


@dataclass(frozen=True)
class And:
    left: TaskExpr
    right: TaskExpr


@dataclass(frozen=True)
class Or:
    left: TaskExpr
    right: TaskExpr


TaskExpr = Attr | Not | And | Or

_TOKEN = re.compile(r"\s*(?:(?P<paren>[()])|(?P<word>[A-Za-z0-9_]+)|(?P<bad>\S))")
_KEYWORDS = ("and", "or", "not")


def _tokenize(text: str) -> list[tuple[str, int]]:
    tokens = []
    for match in _TOKEN.finditer(text):
        if match.group("bad") is not None:
            raise ValueError(
                f"unexpected character {match.group('bad')!r} at position {match.start('bad')} in {text!r}"
            )
        kind = "paren" if match.group("paren") is not None else "word"
        tokens.append((match.group(kind), match.start(kind)))
    return tokens


def parse_task_expression(text: str, valid_attributes: tuple[str, ...] | None = None) -> TaskExpr:
    """Parse e.g. `Male and not Eyeglasses`. Raises ValueError naming the problem and its position.

    `valid_attributes` (default: CelebA's 40 names) lists the attribute names the expression may use.
    """
    names = CELEBA_ATTRIBUTES if valid_attributes is None else valid_attributes
    tokens = _tokenize(text)
    if not tokens:
        raise ValueError("empty task expression: expected attribute names joined by and/or/not")
    position = 0

    def peek() -> str | None:
        return tokens[position][0] if position < len(tokens) else None

    def take() -> tuple[str, int]:
        nonlocal position
        if position >= len(tokens):
            raise ValueError(f"task expression {text!r} ends early: expected an attribute name or '('")
        token = tokens[position]
        position += 1
        return token

    def parse_or() -> TaskExpr:
        node = parse_and()
        while peek() == "or":
            take()
            node = Or(node, parse_and())
        return node

    def parse_and() -> TaskExpr:
        node = parse_not()
        while peek() == "and":
            take()
            node = And(node, parse_not())
        return node

    def parse_not() -> TaskExpr:
        if peek() == "not":
            take()
            return Not(parse_not())
        word, at = take()
        if word == "(":
            node = parse_or()
            closing, closing_at = take() if peek() is not None else (None, len(text))
            if closing != ")":
                raise ValueError(f"expected ')' at position {closing_at} in {text!r}")
            return node
        if word == ")" or word in _KEYWORDS:
            raise ValueError(f"unexpected {word!r} at position {at} in {text!r}: expected an attribute name")
        if word not in names:
            raise ValueError(
                f"unknown attribute {word!r} in {text!r}; valid attribute names: {', '.join(names)}"
            )
        return Attr(word)

    expression = parse_or()
    if position < len(tokens):
        word, at = tokens[position]
        raise ValueError(f"unexpected {word!r} at position {at} in {text!r}: expected 'and', 'or' or the end")
    return expression


def expression_attributes(expression: TaskExpr) -> set[str]:
    """Every attribute name an expression reads."""
    if isinstance(expression, Attr):
        return {expression.name}
    if isinstance(expression, Not):
        return expression_attributes(expression.operand)
    return expression_attributes(expression.left) | expression_attributes(expression.right)


# --------------------------------------------------------------------------------------------------------
# Schema


class StrictModel(BaseModel):
    """Every contract model rejects unknown keys, so a typo is an error rather than a silent default; NaN and
    infinities serialise as numbers (as json.dumps writes them), not as null."""

    model_config = ConfigDict(extra="forbid", ser_json_inf_nan="constants")


class ProceduralConfig(StrictModel):
    num_images: int = Field(
        default=10_000,
        ge=1,
        le=1_000_000,
        description="How many procedural faces exist (drawn on demand by index).",
    )
    seed: int = Field(
        default=0,
        ge=0,
        description="Seed of the procedural face set; each image is a pure function of (seed, index).",
    )
    native_size: int = Field(
        default=128,
        ge=16,
        le=512,
        description="Side in pixels at which a face is drawn before resizing to `resolution`.",
    )


class UniformPartition(StrictModel):
    kind: Literal["uniform"] = Field(
        default="uniform", description="Each edge's shard is a uniform draw from its task's images."
    )


class DirichletPartition(StrictModel):
    kind: Literal["dirichlet"] = Field(
        description=(
            "Each edge's shard is skewed over the value combinations of `attributes`: the edge's share of "
            "each combination is drawn from Dirichlet(alpha x the combination's share of the task's images)."
        )
    )
    attributes: list[str] = Field(
        min_length=1,
        max_length=6,
        description="Secondary CelebA attributes the shards are skewed over (2**len combinations).",
    )
    alpha: float = Field(
        gt=0,
        le=1e6,
        description="Concentration: small values give each edge a few combinations; large ones approach "
        "the uniform draw.",
    )

    @field_validator("attributes")
    @classmethod
    def _known_attributes(cls, value: list[str]) -> list[str]:
        unknown = [name for name in value if name not in CELEBA_ATTRIBUTES]
        if unknown:
            raise ValueError(f"unknown attribute(s) {', '.join(unknown)}; valid: CelebA's 40 attribute names")
        if len(set(value)) != len(value):
            raise ValueError(f"duplicate attributes in {value}")
        return value


PartitionConfig = Annotated[UniformPartition | DirichletPartition, Field(discriminator="kind")]


class DataConfig(StrictModel):
    root: str | None = Field(
        default=None,
        description=(
            "Folder in torchvision's CelebA layout (img_align_celeba/, list_attr_celeba.txt, "
            "list_eval_partition.txt). Unset: $BAIM_DATA_ROOT, else ../shared/data/celeba beside the "
            "project. A relative path is relative to the working directory; `~` is expanded."
        ),
    )
    require_real: bool = Field(
        default=False,
        description="Fail when no CelebA is found at the root instead of using the procedural faces.",
    )
    resolution: int = Field(
        default=32, ge=8, le=1024, description="Side in pixels of the square images models see."
    )
    training_partitions: list[Literal["train", "valid"]] = Field(
        default=["train", "valid"],
        min_length=1,
        description=(
            "Official CelebA partitions the cloud, holdout and edge shards are drawn from. The test split "
            "always comes from the official test partition when the partition file has one."
        ),
    )
    test_per_task: int | Literal["all"] = Field(
        default=200,
        description=(
            "Test images per task, at least 1 (default for tasks without `test_size`). `all`: every image "
            "of the official test partition matching the task (needs a partition file with test images)."
        ),
    )
    cloud_per_task: int = Field(
        default=400,
        ge=0,
        description=(
            "Images per task in the cloud's common training shard (default for `cloud_size`). Uploads are "
            "checked on these when a task has no holdout images."
        ),
    )
    holdout_per_task: int = Field(
        default=32,
        ge=0,
        description=(
            "Images per task held out for upload plausibility checks, disjoint from cloud training "
            "(default for `holdout_size`). Holdout + cloud images must be at least 1 per task."
        ),
    )
    procedural: ProceduralConfig = Field(
        default_factory=ProceduralConfig, description="The face set generated when no CelebA is found."
    )
    partition: PartitionConfig = Field(
        default_factory=UniformPartition,
        description="How edge shards are drawn within a task: `uniform` or `dirichlet` (non-IID).",
    )

    @field_validator("test_per_task")
    @classmethod
    def _test_size_positive(cls, value: int | str) -> int | str:
        # An empty test split breaks every loss the run reports (FedAvg, the local and Ray Train rounds).
        if isinstance(value, int) and value < 1:
            raise ValueError(f"must be >= 1 or 'all', received {value}")
        return value

    def resolved_root(self) -> Path:
        """The data root this config points at: `root`, else $BAIM_DATA_ROOT, else the shared copy."""
        if self.root is not None:
            return Path(self.root).expanduser().resolve()
        from_env = os.environ.get(DATA_ROOT_ENV)
        if from_env:
            return Path(from_env).expanduser().resolve()
        return DEFAULT_DATA_ROOT.resolve()


class TaskConfig(StrictModel):
    name: str = Field(pattern=NAME_PATTERN, description="Task name, used in URLs, registry keys and reports.")
    expression: str = Field(
        description=(
            "Which images belong to the task: CelebA attribute names joined by `and`, `or`, `not` and "
            "parentheses, e.g. `Male and not Eyeglasses`."
        )
    )
    test_size: int | Literal["all"] | None = Field(
        default=None, description="Test images for this task, at least 1; unset: `data.test_per_task`."
    )
    cloud_size: int | None = Field(
        default=None, ge=0, description="Cloud training images; unset: `data.cloud_per_task`."
    )
    holdout_size: int | None = Field(
        default=None, ge=0, description="Holdout images for upload checks; unset: `data.holdout_per_task`."
    )

    @field_validator("expression")
    @classmethod
    def _expression_parses(cls, value: str) -> str:
        parse_task_expression(value)
        return value

    @field_validator("test_size")
    @classmethod
    def _test_size_positive(cls, value: int | str | None) -> int | str | None:
        if isinstance(value, int) and value < 1:
            raise ValueError(f"must be >= 1 or 'all', received {value}")
        return value

    def parsed(self) -> TaskExpr:
        return parse_task_expression(self.expression)


class ModelSpecConfig(StrictModel):
    widths: list[Annotated[int, Field(ge=1, le=4096)]] = Field(
        min_length=1,
        max_length=8,
        description="Channels of each encoder stage; each stage halves the resolution (depth = len(widths)).",
    )
    latent_dim: int = Field(ge=1, le=4096, description="Size of the VAE's latent vector.")


class LinkConfig(StrictModel):
    bandwidth_mbps: float = Field(
        default=100.0, gt=0, description="Uplink/downlink bandwidth in Mbit/s (simulated)."
    )
    latency_ms: float = Field(default=20.0, ge=0, description="One-way latency in milliseconds (simulated).")


class EarlyStoppingConfig(StrictModel):
    """Stop an edge's local training when its own validation loss stops improving."""

    patience: int = Field(
        default=3, ge=1, le=10_000, description="Epochs without improvement before training stops."
    )
    validation_fraction: float = Field(
        default=0.1,
        gt=0,
        lt=1,
        description="Fraction of the edge's own shard held out (seeded) to measure convergence; at least "
        "one image, and at least one left to train on.",
    )
    min_delta: float = Field(
        default=0.0, ge=0, description="An epoch improves when the validation loss drops by more than this."
    )


class UsersConfig(StrictModel):
    count: int = Field(ge=1, le=1_000_000, description="End users behind the edge.")
    requests_per_second: float = Field(
        default=0.1, gt=0, le=1e6, description="Generation requests each user sends per second."
    )
    images_per_request: int = Field(default=1, ge=1, le=64, description="Images each request asks for.")
    link: LinkConfig = Field(
        default_factory=lambda: LinkConfig(bandwidth_mbps=50.0, latency_ms=5.0),
        description="The users' link to the edge (simulated).",
    )


class EdgeFields(StrictModel):
    """Fields shared by a single edge and an edge group."""

    task: str = Field(description="Name of the task this edge's private shard belongs to.")
    shard_size: int = Field(ge=1, description="Images in the edge's private (non-IID) training shard.")
    model: ModelSpecConfig = Field(description="The edge's VAE; the resolution comes from `data.resolution`.")
    num_cpus: float = Field(default=1.0, gt=0, description="CPUs the edge actor reserves in Ray.")
    num_gpus: float = Field(
        default=0.0,
        ge=0,
        description="GPUs the edge actor reserves in Ray; above 0, it trains on CUDA when CUDA is available.",
    )
    memory_mb: int | None = Field(
        default=None, gt=0, description="Memory the edge actor reserves in Ray, in MiB."
    )
    custom_resources: dict[str, Annotated[float, Field(gt=0)]] = Field(
        default_factory=dict, description="Custom Ray resources the edge actor needs, e.g. {edge_site: 1}."
    )
    local_epochs: int = Field(
        default=1,
        ge=1,
        le=10_000,
        description="Epochs of local training before the upload (the cap, with `early_stopping`).",
    )
    early_stopping: EarlyStoppingConfig | None = Field(
        default=None,
        description="Stop on convergence of a validation split of the edge's own shard and upload the best "
        "epoch's weights; unset: train exactly `local_epochs` on the whole shard.",
    )
    batch_size: int = Field(default=32, ge=1, description="Local training batch size.")
    lr: float = Field(default=1e-3, gt=0, le=10, description="Local learning rate (Adam).")
    link: LinkConfig = Field(default_factory=LinkConfig, description="The edge's network link to the cloud.")
    gflops: float = Field(
        default=10.0,
        gt=0,
        le=1e9,
        description="Declared compute speed in GFLOP/s: the split-inference cost model's edge speed.",
    )
    users: UsersConfig | None = Field(
        default=None,
        description="End users behind this edge sending generation requests (end -> edge -> cloud); the "
        "report gives their request latency for each placement of the generation.",
    )
    start: bool = Field(
        default=True,
        description="Start with the run. `false`: the edge joins only when a timeline `join` event names it.",
    )


class EdgeConfig(EdgeFields):
    id: str = Field(pattern=NAME_PATTERN, description="Unique edge id.")


class EdgeGroupConfig(EdgeFields):
    prefix: str = Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,57}$",
        description="Edge ids are `<prefix>-<i>`, i = 0 .. count-1.",
    )
    count: int = Field(ge=1, le=10_000, description="How many identical edges the group declares.")

    def expand(self) -> list[EdgeConfig]:
        fields = self.model_dump(exclude={"prefix", "count"})
        return [EdgeConfig(id=f"{self.prefix}-{i}", **fields) for i in range(self.count)]


class FusionPolicy(StrictModel):
    min_new_models: int = Field(
        default=1,
        ge=1,
        description="Train the BAIM once this many new edge models have been fused since the last round.",
    )
    max_wait_seconds: float = Field(
        default=30.0, gt=0, description="Train anyway once the oldest untrained arrival has waited this long."
    )


class UploadLimits(StrictModel):
    max_upload_bytes: int = Field(
        default=50_000_000, ge=1, description="Uploads larger than this (weights + spec) are rejected unread."
    )
    max_plausibility_loss: float = Field(
        default=10.0,
        gt=0,
        description=(
            "An upload whose mean VAE loss on the task's holdout images exceeds this is rejected as "
            "implausible (catches poisoned or broken models)."
        ),
    )
    max_loss_ratio: float = Field(
        default=2.5,
        gt=0,
        description=(
            "An upload whose holdout loss exceeds this multiple of the holdout's pixel variance (the loss "
            "of predicting every image by the holdout's mean image, which any useful model must beat) is "
            "rejected as implausible. Measured: trained edges 0.4-1.2 on CelebA (1.5-1.65 on the "
            "procedural faces, where tiny edges learn little), untrained learners 1.2-2.14, sign-flipped "
            "2.8-3.2 (2.1 procedural), Gaussian noise of 3x each tensor's std 2.1-3.1, weights x3 5+. "
            "The default accepts untrained learners; with real data and trained edges 1.25-1.5 also "
            "rejects untrained and noise-image models."
        ),
    )
    max_weight_norm_ratio: float = Field(
        default=50.0,
        ge=1,
        description=(
            "An upload with a tensor whose RMS exceeds this multiple of the same tensor's RMS in a freshly "
            "initialised learner of the declared architecture (the whole fresh learner's RMS for tensors "
            "that start at zero) is rejected as implausible. Catches inflated weights whose effect a "
            "normalisation layer hides from the loss; honest training moved tensors at most 2.8x "
            "(6 to 25 epochs on CelebA)."
        ),
    )
    rejected_receipts_per_edge: int = Field(
        default=16,
        ge=1,
        le=10_000,
        description=(
            "How many receipts of rejected uploads the coordinator keeps per edge (all edge ids that are "
            "not in the scenario share one allowance): the most recent ones, shown in status and the report, "
            "and returned as they are when the same upload is sent again. Older ones are dropped, so an edge "
            "that sends many bad uploads does not pile up receipts in memory and in every checkpoint. The "
            "ledger still counts every rejection by reason; an upload whose receipt was dropped is validated "
            "(and counted) again if re-sent."
        ),
    )
    max_concurrent_validations: int | None = Field(
        default=None,
        ge=1,
        le=1024,
        description=(
            "How many uploads the coordinator validates at once; the others wait their turn (their bytes "
            "already received). A validation holds the decoded tensors and a model built from them, so this "
            "bounds that memory. Unset: one per CPU the coordinator's process may use, at least 2 and at "
            "most 16 (validation is CPU-bound, so more at once would not finish sooner, and threads stay "
            "free for registry writes and fusion)."
        ),
    )


# Measured with benchmarks/bench_train.py at quickstart's size (docs/design/training.md says how).
CHECKPOINT_EVERY_DEFAULT = 2
AUTO_LOCAL_MAX_FLOPS_DEFAULT = 2e11


class CloudConfig(StrictModel):
    strategies: list[Literal["finetune", "freeze", "scratch"]] = Field(
        default=["finetune", "freeze", "scratch"],
        min_length=1,
        description="BAIM training strategies to run and compare.",
    )
    epochs: int = Field(default=5, ge=1, le=100_000, description="Cloud training epochs per strategy.")
    lr: float = Field(default=0.005, gt=0, le=10, description="Cloud learning rate.")
    batch_size: int = Field(
        default=64, ge=1, description="Cloud training batch size (global, across workers)."
    )
    kld_weight: float = Field(
        default=0.00025, ge=0, description="Weight of the KL divergence in the VAE loss."
    )
    top_k: int = Field(
        default=2, ge=1, description="Learners each LSGate selects (K); at most the smallest squad."
    )
    connection_height: int = Field(
        default=3,
        ge=0,
        description="Largest stage gap h of a linear projection connection (0 <= j - i <= h).",
    )
    prune_interval: int = Field(default=10, ge=1, description="Prune connections every this many epochs.")
    prune_ratio: float = Field(
        default=0.1, ge=0, lt=1, description="Fraction of surviving connections removed at each pruning step."
    )
    task_model_budget: float | None = Field(
        default=None,
        gt=1.0,
        le=1000.0,
        description=(
            "Largest task model allowed, as a multiple of the parameters of that task's own squad (its "
            "edges' learners). Pruning reaches it by the last pruning epoch, removing the connections with "
            "the least contribution per task-model parameter they pin; prune_ratio is then not used. Unset: "
            "the paper's schedule (prune_ratio of the surviving connections per pruning, by contribution)."
        ),
    )
    recovery_epochs: int = Field(
        default=0,
        ge=0,
        le=100_000,
        description=(
            "Final cloud epochs without pruning (fine-tuning what survived); pruning runs every "
            "prune_interval epochs up to epochs - recovery_epochs."
        ),
    )
    prune_shape: Literal["geometric", "cubic"] = Field(
        default="cubic",
        description=(
            "How a task_model_budget is approached over the pruning epochs: cubic (Zhu & Gupta 2017: the "
            "excess over the limit falls as (1 - progress)^3, most of it at the first prunings, leaving the "
            "later epochs to recover; measured lower test loss than geometric, docs/results.md) or "
            "geometric (each task model's size / limit shrinks by the same factor at every pruning). Either "
            "way the last pruning epoch reaches the budget. Not used without a budget."
        ),
    )
    prune_score_images: int = Field(
        default=64,
        ge=1,
        le=100_000,
        description=(
            "Cloud images per task (the first of each task's common shard, the same on every worker) on "
            "which connections are scored at each pruning."
        ),
    )
    keep: Literal["finetune", "freeze", "scratch", "best"] = Field(
        default="finetune",
        description=(
            "Which strategy's trained BAIM is decomposed and published: a strategy (one of `strategies`), or "
            "best: the one with the lowest loss on the cloud's held-out images (data.holdout_per_task)."
        ),
    )
    checkpoint_every: int = Field(
        default=CHECKPOINT_EVERY_DEFAULT,
        ge=1,
        le=100_000,
        description=(
            "Ray Train checkpoints (weights, optimiser, pruning state; the ranks' state hashes compared) "
            "after every this many epochs, and after the last epoch always. A worker failure loses at most "
            "this many epochs. The default keeps a Ray Train epoch within 1.10x of a plain PyTorch loop at "
            "quickstart's size (benchmarks/bench_train.py)."
        ),
    )
    evaluate_every: int = Field(
        default=1,
        ge=1,
        le=100_000,
        description=(
            "Measure the test loss after every this many cloud epochs, and after the last epoch always "
            "(the loss curves have a point per evaluated epoch)."
        ),
    )
    trainer: Literal["auto", "ray_train", "local"] = Field(
        default="auto",
        description=(
            "How a cloud round trains. ray_train: one Ray Train TorchTrainer job per strategy (DDP, "
            "checkpoints, FailureConfig resume). local: the same loop in a thread of the coordinator (no "
            "start-up cost, no checkpoints). auto: local when use_gpu is false and a strategy's estimated "
            "training FLOPs are at most auto_local_max_flops, else ray_train."
        ),
    )
    auto_local_max_flops: float = Field(
        default=AUTO_LOCAL_MAX_FLOPS_DEFAULT,
        ge=0,
        description=(
            "trainer: auto runs a round in the coordinator when one strategy's training FLOPs (one "
            "measured step x steps per epoch x epochs) are at most this. The default is about what the "
            "in-process loop computes on one CPU core in the measured fixed start-up of a Ray Train job "
            "(docs/design/training.md, 'Choosing the runner')."
        ),
    )
    num_workers: int = Field(default=1, ge=1, le=1024, description="Ray Train workers (DDP ranks).")
    use_gpu: bool = Field(default=False, description="Ray Train workers use a GPU each.")
    cpus_per_worker: float = Field(default=1.0, gt=0, description="CPUs each Ray Train worker reserves.")
    wait_for_nodes_s: float = Field(
        default=0.0,
        ge=0,
        le=24 * 3600,
        description=(
            "When the nodes up now cannot host the Ray Train workers (e.g. no GPU node yet): 0 fails the "
            "round at once; above 0, ask the cluster's autoscaler for the workers' resources and wait up to "
            "this many seconds for them (cluster.yaml's GPU nodes start at min_workers 0: use e.g. 900)."
        ),
    )
    continual: Literal["gate_only", "finetune_all"] = Field(
        default="finetune_all",
        description=(
            "How a round after the first (triggered by new arrivals) trains. gate_only: the learners a "
            "previous round trained stay frozen, and so do the connections between them; the gates, the "
            "new learners' connections and (with strategy finetune; not with freeze) the new learners "
            "train, in one run of the strategy whose BAIM the round continues from (cloud.keep; for best, "
            "the one the last round kept; a BAIM scratch trained continues as finetune). finetune_all: "
            "every round trains as the first did. Either way every task's test loss is measured before "
            "and after the round (forgetting)."
        ),
    )
    min_selection_rate: float | None = Field(
        default=None,
        ge=0,
        lt=1,
        description=(
            "Model-level pruning before decomposition: a learner whose LSGate selection rate on the cloud's "
            "common data (the share of the samples routed to its squads that select it) is below this is "
            "taken out of its squads; one that still feeds other learners is kept as a cut feeder. Unset: "
            "no learner is pruned."
        ),
    )
    few_shot_steps: int = Field(
        default=200,
        ge=1,
        le=100_000,
        description=(
            "Optimiser steps of a `new_task` event's few-shot training (the new LSGate alone, and the "
            "cloud-only VAE it is compared with), each over all k shots."
        ),
    )
    fusion: FusionPolicy = Field(
        default_factory=FusionPolicy, description="When fused arrivals trigger training."
    )
    max_learners_per_task: int | None = Field(
        default=None,
        ge=1,
        le=100_000,
        description=(
            "Most learners a task contributes to the BAIM. Unset: every accepted upload's learner joins. "
            "Set: the best holdout losses are admitted (the plausibility check's loss); a better upload "
            "replaces the worst admitted learner of its task not yet trained by a cloud round, and one that "
            "is not better is kept only in the registry. Every receipt says which (docs/scale.md, "
            "'A bounded BAIM')."
        ),
    )
    uploads: UploadLimits = Field(
        default_factory=UploadLimits, description="What the cloud accepts from edges."
    )

    @field_validator("strategies")
    @classmethod
    def _strategies_unique(cls, value: list[str]) -> list[str]:
        duplicates = sorted({s for s in value if value.count(s) > 1})
        if duplicates:
            raise ValueError(f"strategies must be unique, received duplicates: {', '.join(duplicates)}")
        return value

    @model_validator(mode="after")
    def _pruning_and_keep(self) -> CloudConfig:
        if self.keep != "best" and self.keep not in self.strategies:
            raise ValueError(
                f"keep: {self.keep!r} is not one of the strategies that run ({', '.join(self.strategies)}); "
                "name one of them or use best"
            )
        if self.max_learners_per_task is not None and self.top_k > self.max_learners_per_task:
            raise ValueError(
                f"max_learners_per_task: {self.max_learners_per_task} is below top_k {self.top_k}; a task's "
                "gates select top_k of its learners, so admit at least that many"
            )
        if self.task_model_budget is not None and self.prune_interval > self.epochs - self.recovery_epochs:
            raise ValueError(
                f"task_model_budget: needs at least one pruning epoch, but prune_interval "
                f"{self.prune_interval} > epochs {self.epochs} - recovery_epochs {self.recovery_epochs}"
            )
        return self


# ----- timeline events: a discriminated union on `kind`


class EventBase(StrictModel):
    at_seconds: float = Field(ge=0, le=1e7, description="Wall-clock seconds after the run starts.")


class JoinEvent(EventBase):
    kind: Literal["join"] = Field(description="An edge joins the running system.")
    edge: str | None = Field(default=None, description="Id of an edge declared with `start: false`.")
    new_edge: EdgeConfig | None = Field(
        default=None, description="A full edge definition, instead of `edge`."
    )

    @model_validator(mode="after")
    def _exactly_one_edge(self) -> JoinEvent:
        if (self.edge is None) == (self.new_edge is None):
            raise ValueError(
                "give exactly one of `edge` (a declared edge id) or `new_edge` (a full definition)"
            )
        return self

    def edge_id(self) -> str:
        if self.new_edge is not None:
            return self.new_edge.id
        assert self.edge is not None  # guaranteed by _exactly_one_edge
        return self.edge


class LeaveEvent(EventBase):
    kind: Literal["leave"] = Field(description="An edge leaves gracefully (finishes nothing further).")
    edge: str = Field(description="Id of the edge.")


class CrashEvent(EventBase):
    kind: Literal["crash"] = Field(description="An edge's process is killed without warning.")
    edge: str = Field(description="Id of the edge.")


class SlowEvent(EventBase):
    kind: Literal["slow"] = Field(description="An edge's compute slows down.")
    edge: str = Field(description="Id of the edge.")
    factor: float = Field(ge=1, le=1000, description="Training takes this many times longer from now on.")


class LinkEvent(EventBase):
    kind: Literal["link"] = Field(description="An edge's network link changes.")
    edge: str = Field(description="Id of the edge.")
    bandwidth_mbps: float | None = Field(
        default=None, gt=0, description="New bandwidth in Mbit/s; unset: unchanged."
    )
    latency_ms: float | None = Field(
        default=None, ge=0, description="New latency in milliseconds; unset: unchanged."
    )

    @model_validator(mode="after")
    def _changes_something(self) -> LinkEvent:
        if self.bandwidth_mbps is None and self.latency_ms is None:
            raise ValueError("a link event needs `bandwidth_mbps` and/or `latency_ms`")
        return self


class PoisonEvent(EventBase):
    kind: Literal["poison"] = Field(description="An edge's next upload is corrupted (an attack or a fault).")
    edge: str = Field(description="Id of the edge.")
    mode: Literal["nan", "wrong_shapes", "scale", "sign_flip", "noise"] = Field(
        description="nan: NaN weights; wrong_shapes: spec and weights disagree; scale: weights x scale; "
        "sign_flip: weights x -1; noise: Gaussian noise of std scale x weight std added."
    )
    scale: float = Field(
        default=10.0, gt=0, le=1e12, description="Strength of the `scale` and `noise` modes."
    )


class CoordinatorCrashEvent(EventBase):
    kind: Literal["coordinator_crash"] = Field(
        description="The cloud coordinator's process is killed; it restarts from its last checkpoint."
    )


class NewTaskConfig(StrictModel):
    """A task that appears while the system runs (a `new_task` event): it has no edges, only k shots."""

    name: str = Field(pattern=NAME_PATTERN, description="Task name, unused by every other task.")
    expression: str = Field(
        description="Which images belong to the task, as for `tasks[].expression` (CelebA attribute names)."
    )
    test_size: int | None = Field(
        default=None, ge=1, description="Test images of the new task; unset: `data.test_per_task`."
    )

    @field_validator("expression")
    @classmethod
    def _expression_parses(cls, value: str) -> str:
        parse_task_expression(value)
        return value

    def parsed(self) -> TaskExpr:
        return parse_task_expression(self.expression)


class NewTaskEvent(EventBase):
    kind: Literal["new_task"] = Field(
        description=(
            "A new task appears with only a few samples: the cloud draws `shots` images of it from its "
            "common data, trains a new LSGate over the existing learners on them alone, decomposes and "
            "publishes the task model (a running `baim serve` deploys it beside the others), and compares "
            "it with a cloud-only VAE trained on the same images."
        )
    )
    task: NewTaskConfig = Field(description="The new task.")
    shots: int = Field(ge=1, le=100_000, description="How many images of the new task the cloud has (k).")


Event = Annotated[
    JoinEvent
    | LeaveEvent
    | CrashEvent
    | SlowEvent
    | LinkEvent
    | PoisonEvent
    | CoordinatorCrashEvent
    | NewTaskEvent,
    Field(discriminator="kind"),
]
EVENT_MODELS: tuple[type[EventBase], ...] = (
    JoinEvent, LeaveEvent, CrashEvent, SlowEvent, LinkEvent, PoisonEvent, CoordinatorCrashEvent, NewTaskEvent,
)  # fmt: skip


class FedAvgConfig(StrictModel):
    enabled: bool = Field(
        default=True, description="Run FedAvg on the same edges and shards as the baseline."
    )
    rounds: int = Field(default=3, ge=1, le=100_000, description="Federated rounds.")
    local_epochs: int = Field(
        default=1, ge=1, le=10_000, description="Local epochs per round on each selected edge."
    )
    client_fraction: float = Field(
        default=1.0, gt=0, le=1, description="Fraction of edges selected each round."
    )
    model: ModelSpecConfig | None = Field(
        default=None,
        description="The one homogeneous model; unset: the largest edge model (by parameter count).",
    )
    aggregation: Literal["mean", "median", "trimmed_mean", "krum"] = Field(
        default="mean",
        description="How the server combines updates: mean (FedAvg, weighted by shard size), median "
        "(coordinate-wise), trimmed_mean (coordinate-wise, `trim_proportion` cut from each end) or krum "
        "(Krum / Multi-Krum with `krum_num_malicious` and `krum_to_keep`); Flower's definitions.",
    )
    trim_proportion: float = Field(
        default=0.1, ge=0, lt=0.5, description="trimmed_mean: fraction of updates cut from each end."
    )
    krum_num_malicious: int = Field(
        default=0, ge=0, description="krum: the number of malicious clients assumed (f)."
    )
    krum_to_keep: int = Field(
        default=0,
        ge=0,
        description="krum: 0 picks one update (Krum); k > 0 averages the k best (Multi-Krum).",
    )
    target_loss: float | None = Field(
        default=None,
        gt=0,
        description="Stop after the first round whose global test loss is at or below this; `rounds` is "
        "the cap.",
    )
    plateau_patience: int | None = Field(
        default=None,
        ge=1,
        description="Stop when the global test loss has not improved by more than `plateau_min_delta` "
        "for this many rounds; unset: no plateau stop.",
    )
    plateau_min_delta: float = Field(
        default=0.0, ge=0, description="The improvement a round must make to reset the plateau count."
    )


CompareMethod = Literal["baim", "fedavg", "fedavg_finetune", "cloud_only", "edge_alone", "centralised"]
COMPARE_METHODS: tuple[CompareMethod, ...] = get_args(CompareMethod)


class CompareConfig(StrictModel):
    """What `baim compare` runs and its budgets. The defaults are small so that any scenario can be compared;
    a scenario whose curves must flatten sets larger ones."""

    methods: list[CompareMethod] = Field(
        default_factory=lambda: list(COMPARE_METHODS),
        min_length=1,
        description="Methods to run: baim (each cloud strategy but scratch), fedavg, fedavg_finetune "
        "(FedAvg, then fine-tuning on the cloud's data), cloud_only (the scratch strategy: the BAIM "
        "architecture from random weights on the cloud's data), edge_alone (each edge's own model), "
        "centralised (one VAE on every shard and the cloud data: the privacy-violating upper bound).",
    )
    baim_epochs: list[Annotated[int, Field(ge=1, le=10_000)]] = Field(
        default_factory=lambda: [1, 2, 4],
        min_length=1,
        description="The BAIM epoch sweep: cloud training runs max(baim_epochs) epochs (replacing "
        "cloud.epochs) and each listed epoch is a point of the curve.",
    )
    fedavg_rounds: int = Field(default=10, ge=1, le=100_000, description="FedAvg's round cap.")
    fedavg_plateau_patience: int | None = Field(
        default=3,
        ge=1,
        description="FedAvg stops when its test loss has not improved (by fedavg_plateau_min_delta) for this "
        "many rounds; null: only the cap (and baselines.fedavg.target_loss) stop it.",
    )
    fedavg_plateau_min_delta: float = Field(
        default=0.0, ge=0, description="The improvement that resets FedAvg's plateau count."
    )
    finetune_epochs: int = Field(
        default=2, ge=1, le=10_000, description="Epochs of cloud fine-tuning after FedAvg (fedavg_finetune)."
    )
    finetune_lr: float | None = Field(
        default=None,
        gt=0,
        le=10,
        description="Adam learning rate of the fine-tuning after FedAvg; unset: the edges' mean `lr` (what "
        "FedAvg's model was trained with: cloud.lr is tuned for the BAIM and knocks a converged model back).",
    )
    centralised_epochs: int = Field(
        default=4, ge=1, le=10_000, description="Epochs of the centralised reference."
    )
    fid_samples: int = Field(
        default=32,
        ge=0,
        description="Generated and real images per FID/KID set, for each method's final model (0: no FID).",
    )
    grid_samples: int = Field(default=16, ge=1, le=256, description="Images in each method's sample grid.")
    target_loss: float | None = Field(
        default=None,
        gt=0,
        description="Time-to-quality target test loss; unset: the best BAIM task models' loss.",
    )

    @model_validator(mode="after")
    def _sorted_sweep(self) -> CompareConfig:
        if len(set(self.baim_epochs)) != len(self.baim_epochs):
            raise ValueError(f"baim_epochs: expected distinct epochs, received {self.baim_epochs}")
        if len(set(self.methods)) != len(self.methods):
            raise ValueError(f"methods: expected distinct methods, received {self.methods}")
        self.baim_epochs = sorted(self.baim_epochs)
        return self


class BaselinesConfig(StrictModel):
    fedavg: FedAvgConfig = Field(default_factory=FedAvgConfig, description="The federated learning baseline.")


class ServingConfig(StrictModel):
    enabled: bool = Field(default=True, description="Deploy the task models with Ray Serve after training.")
    host: str = Field(
        default="127.0.0.1", min_length=1, description="HTTP bind address (loopback by default)."
    )
    port: int = Field(default=8000, ge=1, le=65535, description="HTTP port.")
    min_replicas: int = Field(
        default=1, ge=0, description="Autoscaling lower bound of replicas per task model."
    )
    max_replicas: int = Field(
        default=2, ge=1, description="Autoscaling upper bound of replicas per task model."
    )
    target_ongoing_requests: float = Field(
        default=2.0, gt=0, description="Autoscaling target of in-flight requests per replica."
    )
    num_cpus: float = Field(default=0.5, gt=0, description="CPUs each replica reserves.")
    max_batch_size: int = Field(
        default=8, ge=1, le=1024, description="Requests `@serve.batch` groups into one call."
    )
    gflops: float = Field(
        default=100.0,
        gt=0,
        le=1e9,
        description="Declared compute speed of a replica in GFLOP/s: the split-inference cost model's "
        "cloud speed.",
    )

    @model_validator(mode="after")
    def _replica_bounds(self) -> ServingConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"min_replicas ({self.min_replicas}) must be <= max_replicas ({self.max_replicas})"
            )
        return self


class PlacementConfig(StrictModel):
    mode: Literal["actor", "pool"] = Field(
        default="actor",
        description=(
            "`actor`: one Ray actor per edge (small runs, real multi-node placement). `pool`: virtual edges "
            "multiplexed on a bounded pool of edge-worker actors, one sub-pool per distinct resource request."
        ),
    )
    max_workers: int | None = Field(
        default=None,
        ge=1,
        le=4096,
        description="Most edge-worker actors in all sub-pools together (pool mode); unset: as many as the "
        "cluster's resources hold, after the coordinator's and the cloud trainer's reservation.",
    )


class VirtualTimeConfig(StrictModel):
    edge_gflops: float = Field(
        default=5.0,
        gt=0,
        le=1e6,
        description="Simulated compute rate of an edge at speed 1 (virtual clock): an epoch takes its "
        "counted training FLOPs / this rate, times the slow-down, divided by the trace's speed factor.",
    )


class TracesConfig(StrictModel):
    path: str | None = Field(
        default=None,
        description="Availability trace (CSV or Parquet: edge_id, start_s, end_s, speed, bandwidth_mbps), "
        "replayed on the virtual clock; rows are online intervals, the gaps between them offline. Edges "
        "not in it are always online. A relative path is relative to the scenario file's folder.",
    )
    offline_upload: Literal["retry", "lost"] = Field(
        default="retry",
        description="An edge offline when it should upload: `retry` when it is back online, or `lost` "
        "(status offline).",
    )


class PersonalisationConfig(StrictModel):
    method: Literal["full", "lora"] = Field(
        default="full",
        description="How an edge fine-tunes its downloaded task model: every parameter, or low-rank adapters "
        "(LoRA, baim.adapters) beside frozen weights.",
    )
    rank: int = Field(default=4, ge=1, le=1024, description="LoRA: the adapters' inner dimension.")
    alpha: float = Field(
        default=8.0, gt=0, le=1e6, description="LoRA: adapter outputs are scaled by alpha/rank."
    )
    target_modules: list[Annotated[str, Field(min_length=1)]] = Field(
        default_factory=lambda: ["Linear", "Conv2d", "ConvTranspose2d"],
        min_length=1,
        description="LoRA: layer types or fnmatch patterns over module names that get adapters.",
    )
    lr: float | None = Field(
        default=None, gt=0, le=10, description="Fine-tuning learning rate (Adam); None: the edge's `lr`."
    )
    relay: bool = Field(
        default=False,
        description="LoRA: edges upload their adapters and the cloud folds them into the BAIM (a relay "
        "round), reporting each task's test loss before and after.",
    )
    relay_method: Literal["fold_own", "distil", "average"] = Field(
        default="fold_own",
        description="Relay: how the cloud takes the adapters in (baim.relay). `distil`: the personalised "
        "models teach the BAIM on the cloud's data (its own loss + `relay_distil_weight` x the squared "
        "difference to the teachers' reconstructions); `fold_own`: each adapter's merged change is added to "
        "the learner its edge uploaded and nowhere else; `average`: every adapted parameter gets the mean "
        "change of the edges that adapted it (feeders and other edges' learners too). fold_own is the "
        "default: the only method whose gain over the same cloud work without the edges' adapters was "
        "positive on every task measured (docs/results.md, GaisNet relay).",
    )
    relay_gate_epochs: int = Field(
        default=2,
        ge=0,
        le=1000,
        description="Relay, fold_own and average: epochs of gate training on cloud data after folding.",
    )
    relay_epochs: int = Field(
        default=2, ge=1, le=1000, description="Relay, distil: epochs over the cloud's data."
    )
    relay_lr: float | None = Field(
        default=None, gt=0, le=10, description="Relay, distil: Adam learning rate; None: `cloud.lr`."
    )
    relay_distil_weight: float = Field(
        default=1.0,
        ge=0,
        le=1e6,
        description="Relay, distil: weight of the distillation term (0: the cloud's own loss alone, the "
        "control that shows what the teachers add).",
    )
    relay_student: Literal["relaying_learners", "baim"] = Field(
        default="relaying_learners",
        description="Relay, distil: what trains: the relaying edges' own learners and the gates, or every "
        "parameter of the BAIM.",
    )
    relay_generated: int = Field(
        default=0,
        ge=0,
        le=100_000,
        description="Relay, distil: images each personalised model draws from its prior per epoch; the BAIM "
        "also learns to reconstruct them (a data-free relay of what the edge's data looks like).",
    )
    relay_guard: bool = Field(
        default=True,
        description="Relay: keep the relay round's BAIM only if no task's loss on the cloud's held-out "
        "images (data.holdout_per_task) rose; otherwise the previous BAIM stays (the report says accepted "
        "or rejected, with both losses).",
    )
    max_relative_delta: float = Field(
        default=5.0,
        gt=0,
        description="Relay: an adapter whose merged change to a layer exceeds this multiple of the layer's "
        "weight norm is rejected as implausible (honest fine-tuning moves small connection projections by "
        "up to ~3x their norm; a scaled attack by orders of magnitude).",
    )

    @model_validator(mode="after")
    def _relay_needs_adapters(self) -> PersonalisationConfig:
        if self.relay and self.method != "lora":
            raise ValueError("relay: needs method 'lora' (edges relay their adapters, not whole models)")
        return self


class Scenario(StrictModel):
    name: str = Field(default="scenario", min_length=1, description="Name shown in logs and reports.")
    description: str = Field(default="", description="Free text for humans.")
    seed: int = Field(
        default=0, ge=0, le=2**63 - 1, description="Seed of partitions, initial weights and sampling."
    )
    data: DataConfig = Field(
        default_factory=DataConfig, description="Where images come from and split sizes."
    )
    tasks: list[TaskConfig] = Field(
        min_length=1, description="The generation tasks (one learner squad each)."
    )
    edges: list[EdgeConfig] = Field(default_factory=list, description="Edges declared one by one.")
    edge_groups: list[EdgeGroupConfig] = Field(
        default_factory=list, description="Groups of identical edges with ids `<prefix>-<i>`."
    )
    cloud: CloudConfig = Field(
        default_factory=CloudConfig, description="The cloud coordinator and BAIM training."
    )
    timeline: list[Event] = Field(
        default_factory=list, description="Events that hit the system while it runs."
    )
    time_scale: float = Field(
        default=1.0,
        ge=0,
        le=1000,
        description="Multiplies simulated link delays and slow-downs (0 disables them; small for tests).",
    )
    time: Literal["wall", "virtual"] = Field(
        default="wall",
        description="`wall`: events fire on the wall clock and delays sleep. `virtual`: a discrete-event "
        "clock; link delays, slow-downs, timeline events and traces advance simulated time without sleeping.",
    )
    virtual_time: VirtualTimeConfig = Field(
        default_factory=VirtualTimeConfig, description="The virtual clock's compute model."
    )
    traces: TracesConfig = Field(
        default_factory=TracesConfig, description="Availability traces (virtual clock only)."
    )
    placement: PlacementConfig = Field(
        default_factory=PlacementConfig, description="How edges are placed on Ray: actor per edge or a pool."
    )
    baselines: BaselinesConfig = Field(
        default_factory=BaselinesConfig, description="Baselines run for comparison."
    )
    serving: ServingConfig = Field(
        default_factory=ServingConfig, description="Ray Serve deployment of task models."
    )
    personalisation: PersonalisationConfig = Field(
        default_factory=PersonalisationConfig,
        description="How edges personalise downloaded task models (end-of-run evaluation).",
    )
    compare: CompareConfig = Field(
        default_factory=CompareConfig, description="Methods and budgets of `baim compare`."
    )

    # ----- derived facts

    def _edges_with_paths(self) -> list[tuple[str, EdgeConfig]]:
        """Every edge with the field path that declares it (for error messages)."""
        found = [(f"edges.{i}", edge) for i, edge in enumerate(self.edges)]
        for g, group in enumerate(self.edge_groups):
            found += [(f"edge_groups.{g}", edge) for edge in group.expand()]
        for e, event in enumerate(self.timeline):
            if isinstance(event, JoinEvent) and event.new_edge is not None:
                found.append((f"timeline.{e}.new_edge", event.new_edge.model_copy(update={"start": False})))
        return found

    def all_edges(self) -> list[EdgeConfig]:
        """Every edge of the run: explicit ones, expanded groups, then edges defined by `join` events
        (returned with `start=False`)."""
        return [edge for _, edge in self._edges_with_paths()]

    def initial_edges(self) -> list[EdgeConfig]:
        """The edges that start with the run."""
        return [edge for edge in self.all_edges() if edge.start]

    def edge(self, edge_id: str) -> EdgeConfig:
        for edge in self.all_edges():
            if edge.id == edge_id:
                return edge
        raise KeyError(f"unknown edge {edge_id!r}")

    def task_names(self) -> list[str]:
        return [task.name for task in self.tasks]

    def task(self, name: str) -> TaskConfig:
        for task in self.tasks:
            if task.name == name:
                return task
        raise UnknownTask(name, self.task_names())

    def squads(self) -> dict[str, list[str]]:
        """Edge ids per task (every edge of the run, including those joining later), in declaration order."""
        squads: dict[str, list[str]] = {name: [] for name in self.task_names()}
        for edge in self.all_edges():
            squads[edge.task].append(edge.id)
        return squads

    def new_tasks(self) -> list[NewTaskEvent]:
        """The timeline's `new_task` events, in file order."""
        return [event for event in self.timeline if isinstance(event, NewTaskEvent)]

    def test_size(self, task: TaskConfig | NewTaskConfig) -> int | Literal["all"]:
        return self.data.test_per_task if task.test_size is None else task.test_size

    def cloud_size(self, task: TaskConfig) -> int:
        return self.data.cloud_per_task if task.cloud_size is None else task.cloud_size

    def holdout_size(self, task: TaskConfig) -> int:
        return self.data.holdout_per_task if task.holdout_size is None else task.holdout_size

    # ----- cross-field rules

    @model_validator(mode="after")
    def check_cross_field_rules(self) -> Scenario:
        problems: list[str] = []
        task_names = self.task_names()
        for name in sorted({n for n in task_names if task_names.count(n) > 1}):
            problems.append(f"tasks: duplicate task name {name!r}")

        edges = self._edges_with_paths()
        if not edges:
            problems.append("edges: the scenario declares no edges (give `edges` and/or `edge_groups`)")
        first_path: dict[str, str] = {}
        resolution = self.data.resolution
        for path, edge in edges:
            if edge.id in first_path:
                problems.append(
                    f"{path}: duplicate edge id {edge.id!r} (first declared at {first_path[edge.id]})"
                )
            else:
                first_path[edge.id] = path
            if edge.task not in task_names:
                problems.append(f"{path}.task: unknown task {edge.task!r}; tasks: {', '.join(task_names)}")
            if edge.early_stopping is not None and edge.shard_size < 2:
                problems.append(
                    f"{path}.early_stopping: needs shard_size >= 2 (one image to validate on, one to train "
                    f"on), received {edge.shard_size}"
                )
            downsampling = 2 ** len(edge.model.widths)
            if resolution % downsampling != 0:
                problems.append(
                    f"{path}.model.widths: data.resolution {resolution} is not divisible by "
                    f"2**len(widths) = {downsampling}"
                )
        if self.cloud.keep == "best" and all(self.holdout_size(task) == 0 for task in self.tasks):
            problems.append(
                "cloud.keep: best chooses by the loss on the cloud's held-out images, but every task has "
                "0 (set data.holdout_per_task or a task's holdout_size above 0)"
            )
        relay = self.personalisation
        if relay.relay and relay.relay_guard and all(self.holdout_size(task) == 0 for task in self.tasks):
            problems.append(
                "personalisation.relay_guard: the guard compares losses on the cloud's held-out images, "
                "but every task has 0 (set data.holdout_per_task or a task's holdout_size above 0, or "
                "relay_guard: false)"
            )
        fedavg_model = self.baselines.fedavg.model
        if fedavg_model is not None and resolution % 2 ** len(fedavg_model.widths) != 0:
            problems.append(
                f"baselines.fedavg.model.widths: data.resolution {resolution} is not divisible by "
                f"2**len(widths) = {2 ** len(fedavg_model.widths)}"
            )

        problems += self._upload_check_image_problems()

        squad_sizes = {name: 0 for name in task_names}
        for _, edge in edges:
            if edge.task in squad_sizes:
                squad_sizes[edge.task] += 1
        for name, size in squad_sizes.items():
            if self.cloud.top_k > size:
                problems.append(
                    f"cloud.top_k: {self.cloud.top_k} is larger than the squad of task {name!r} "
                    f"({size} edge{'s' if size != 1 else ''})"
                )

        problems += self._timeline_problems(first_path)
        if self.traces.path is not None and self.time != "virtual":
            problems.append("traces.path: a trace is replayed on the virtual clock; set `time: virtual`")
        if problems:
            # An edge group reports a problem once, not once per expanded edge.
            raise ValueError("\n".join(dict.fromkeys(problems)))
        return self

    def _upload_check_image_problems(self) -> list[str]:
        """Every task needs holdout or cloud images: the coordinator checks uploads on its holdout (its cloud
        images when the holdout is empty), and with neither it would reject every upload of the task."""
        problems: list[str] = []
        for t, task in enumerate(self.tasks):
            holdout, cloud = self.holdout_size(task), self.cloud_size(task)
            if holdout + cloud >= 1:
                continue
            if task.holdout_size is None and task.cloud_size is None:
                # The same message for every task, so it is reported once.
                problems.append(
                    "data.holdout_per_task: 0 holdout and 0 cloud images per task (data.cloud_per_task) "
                    "leave no images to check uploads on; expected holdout_per_task + cloud_per_task >= 1"
                )
            else:
                field = "holdout_size" if task.holdout_size is not None else "cloud_size"
                problems.append(
                    f"tasks.{t}.{field}: task {task.name!r} has 0 holdout and 0 cloud images (holdout_size "
                    "and cloud_size, else data.holdout_per_task and data.cloud_per_task) and no images to "
                    "check uploads on; expected holdout + cloud >= 1"
                )
        return problems

    def _timeline_problems(self, first_path: dict[str, str]) -> list[str]:
        problems: list[str] = []
        starts = {edge.id: edge.start for _, edge in self._edges_with_paths()}
        join_times: dict[str, float] = {}
        for e, event in enumerate(self.timeline):
            if not isinstance(event, JoinEvent):
                continue
            edge_id = event.edge_id()
            if event.edge is not None:
                if edge_id not in starts:
                    problems.append(f"timeline.{e}.edge: join names unknown edge {edge_id!r}")
                    continue
                if starts[edge_id]:
                    problems.append(
                        f"timeline.{e}.edge: edge {edge_id!r} starts with the run; declare it with "
                        "`start: false` to have it join later"
                    )
            if edge_id in join_times:
                problems.append(f"timeline.{e}: edge {edge_id!r} joins twice")
            else:
                join_times[edge_id] = event.at_seconds
        for edge_id, starts_now in starts.items():
            if not starts_now and edge_id not in join_times:
                problems.append(
                    f"{first_path[edge_id]}.start: edge {edge_id!r} has `start: false` but no join event"
                )

        problems += self._new_task_problems()
        for e, event in enumerate(self.timeline):
            if isinstance(event, JoinEvent | CoordinatorCrashEvent | NewTaskEvent):
                continue
            edge_id = event.edge
            if edge_id not in starts:
                known = ", ".join(starts) if len(starts) <= 20 else f"{len(starts)} edges"
                problems.append(f"timeline.{e}.edge: unknown edge {edge_id!r} (known: {known})")
            elif edge_id in join_times and event.at_seconds < join_times[edge_id]:
                problems.append(
                    f"timeline.{e}.at_seconds: {event.kind} of edge {edge_id!r} at {event.at_seconds}s "
                    f"comes before it joins at {join_times[edge_id]}s"
                )
        return problems

    def _new_task_problems(self) -> list[str]:
        """A new task's name is new (not a declared task, not an earlier new task); no edge trains it."""
        problems: list[str] = []
        seen = {name: "tasks" for name in self.task_names()}
        for e, event in enumerate(self.timeline):
            if not isinstance(event, NewTaskEvent):
                continue
            name = event.task.name
            if name in seen:
                problems.append(
                    f"timeline.{e}.task.name: task {name!r} exists already (in {seen[name]}); a new_task "
                    "event names a task that is not there yet"
                )
            else:
                seen[name] = f"timeline.{e}"
        return problems


# --------------------------------------------------------------------------------------------------------
# Loading and error formatting


def load_scenario(path: str | os.PathLike[str]) -> Scenario:
    """Read and validate a scenario file.

    Raises ScenarioError for a missing file, a YAML syntax error (with its line) or a document that is not a
    mapping, and pydantic's ValidationError for schema problems (see `format_validation_error`).
    """
    scenario_path = Path(path)
    try:
        text = scenario_path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ScenarioError(f"{scenario_path}: scenario file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ScenarioError(f"{scenario_path}: cannot read scenario file: {exc}") from None
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        where = ""
        mark = getattr(exc, "problem_mark", None)
        if mark is not None:
            where = f" line {mark.line + 1}, column {mark.column + 1}:"
        problem = getattr(exc, "problem", None) or str(exc)
        raise ScenarioError(f"{scenario_path}:{where} YAML syntax error: {problem}") from None
    if not isinstance(document, dict):
        raise ScenarioError(
            f"{scenario_path}: expected a YAML mapping at the top level, received {type(document).__name__}"
        )
    scenario = Scenario.model_validate(document)
    trace = scenario.traces.path
    if trace is not None and not Path(trace).expanduser().is_absolute():
        resolved = (scenario_path.parent / trace).resolve()
        scenario = scenario.model_copy(
            update={"traces": scenario.traces.model_copy(update={"path": str(resolved)})}
        )
    logger.info(
        "loaded scenario %r from %s (%d edges)", scenario.name, scenario_path, len(scenario.all_edges())
    )
    return scenario


def format_validation_error(exc: ValidationError) -> list[str]:
    """One line per problem: `edges.3.num_cpus: Input should be greater than 0`.

    Cross-field rules already start each of their lines with the field path they concern.
    """
    lines = []
    for error in exc.errors():
        path = ".".join(str(part) for part in error["loc"])
        message = error["msg"].removeprefix("Value error, ")
        for part in message.splitlines():
            lines.append(f"{path}: {part}" if path else part)
    return lines


# --------------------------------------------------------------------------------------------------------
# Reference documentation generated from the models (docs/scenario-reference.md, `baim schema`)


_YAML_TYPE_NAMES = {str: "string", int: "integer", float: "number", bool: "boolean", type(None): "null"}


def _type_name(annotation: Any) -> str:
    """A YAML-minded name for a field's type: `integer or "all"`, `list of EdgeConfig`."""
    origin, args = get_origin(annotation), get_args(annotation)
    if annotation in _YAML_TYPE_NAMES:
        return _YAML_TYPE_NAMES[annotation]
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return f"{annotation.__name__} mapping"
    if origin is Annotated:
        return _type_name(args[0])
    if origin is Literal:
        return " or ".join(f'"{value}"' for value in args)
    if origin in (Union, UnionType):
        if all(isinstance(arg, type) and issubclass(arg, EventBase) for arg in args):
            return "event mapping (by `kind`)"
        return " or ".join(_type_name(arg) for arg in args)
    if origin is list:
        return f"list of {_type_name(args[0])}"
    if origin is dict:
        return f"mapping of {_type_name(args[0])} to {_type_name(args[1])}"
    return str(annotation)


def _constraints(field: Any) -> str:
    parts = []
    for item in field.metadata:
        for bound in ("gt", "ge", "lt", "le", "min_length", "max_length", "pattern"):
            value = getattr(item, bound, None)
            if value is not None:
                symbol = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}.get(bound, bound)
                parts.append(f"{symbol} {value}")
    return ", ".join(parts)


def _default(field: Any) -> str:
    if field.is_required():
        return "required"
    if field.default_factory is not None:
        value = field.default_factory()
        if isinstance(value, BaseModel):
            return "see below"
        return f"`{value}`"
    if field.default is None:
        return "`null`"
    return f"`{field.default}`" if field.default != "" else '`""`'


def scenario_reference_markdown() -> str:
    """The scenario reference (docs/scenario-reference.md), generated from the pydantic models."""
    sections: list[tuple[str, type[BaseModel]]] = [
        ("Scenario (top level)", Scenario),
        ("data", DataConfig),
        ("data.procedural", ProceduralConfig),
        ("data.partition, kind: dirichlet (kind: uniform has no other field)", DirichletPartition),
        ("tasks[]", TaskConfig),
        ("edges[]", EdgeConfig),
        ("edge_groups[]", EdgeGroupConfig),
        ("early_stopping (edges, edge_groups)", EarlyStoppingConfig),
        ("model (edges, edge_groups, baselines.fedavg)", ModelSpecConfig),
        ("link (edges, edge_groups)", LinkConfig),
        ("edges[].users", UsersConfig),
        ("cloud", CloudConfig),
        ("cloud.fusion", FusionPolicy),
        ("cloud.uploads", UploadLimits),
        *[(f"timeline[], kind: {get_args(m.model_fields['kind'].annotation)[0]}", m) for m in EVENT_MODELS],
        ("timeline[].task (kind: new_task)", NewTaskConfig),
        ("baselines.fedavg", FedAvgConfig),
        ("serving", ServingConfig),
        ("personalisation", PersonalisationConfig),
        ("placement", PlacementConfig),
        ("virtual_time", VirtualTimeConfig),
        ("traces", TracesConfig),
        ("compare", CompareConfig),
    ]
    lines = [
        "# Scenario reference",
        "",
        "<!-- Generated by `baim schema --out docs/scenario-reference.md` from orchestrator/core/scenario.py."
        " Do not edit by hand. -->",
        "",
        "A scenario is one YAML file (see `scenarios/`). Unknown keys are errors. `baim validate FILE`",
        "checks a file and prints every problem as `field.path: message`.",
        "",
        "Rules across fields: task names and edge ids are unique; every edge names a declared task;",
        "`data.resolution` is divisible by `2**len(model.widths)` for every model; `cloud.top_k` is at",
        "most the number of edges of each task (counting edges that join later); timeline events name",
        "declared edges (or edges defined by an earlier `join`) and do not precede the edge's join; an",
        "edge with `start: false` is joined by exactly one `join` event; `serving.min_replicas <=",
        "max_replicas`.",
        "Whether the data can supply every requested size is checked when the data is partitioned",
        "(`baim demo`, `baim run`), since it depends on the data found.",
        "",
    ]
    return "\n".join(lines + model_field_tables(sections))


def model_field_tables(sections: Sequence[tuple[str, type[BaseModel]]]) -> list[str]:
    """One Markdown table per (title, model): every field's type, default, bounds and description."""
    lines: list[str] = []
    for title, model in sections:
        lines += [
            f"## {title}",
            "",
            "| field | type | default | bounds | description |",
            "|---|---|---|---|---|",
        ]
        # A model's own fields first (an edge's `id` before the fields it shares with edge groups).
        own = [name for name in model.__annotations__ if name in model.model_fields]
        ordered = own + [name for name in model.model_fields if name not in own]
        for name in ordered:
            field = model.model_fields[name]
            if name == "kind":
                continue
            cells = [f"`{name}`", _type_name(field.annotation), _default(field), _constraints(field)]
            cells.append(field.description or "")
            lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
        lines.append("")
    return lines
