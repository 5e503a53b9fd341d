"""report.md and plots/*.png from a run's report.json (`baim report DIR`; `baim run` calls it at the end).

What the page shows and why: docs/ARCHITECTURE.md ("report.md"). Plots use matplotlib's object API (no pyplot
state, no display); sample grids come from the uint8 safetensors the evaluation saved under DIR/samples/.
"""

from __future__ import annotations

import collections
import json
import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from pydantic import ValidationError
from safetensors.numpy import load_file

from orchestrator.core.names import BAIM_OWNER
from orchestrator.core.receipts import RayTrainStrategyRun
from orchestrator.core.reports import (
    REPORT_FORMAT_VERSION,
    FedAvgEdgeRow,
    FedAvgReport,
    ImageQuality,
    PersonalisedEdge,
    RunReport,
)
from orchestrator.core.scenario import format_validation_error
from orchestrator.report.lifecycle import lifecycle_section
from orchestrator.report.scale import EDGE_TABLE_LIMIT, EDGES_PARQUET, edges_summary, write_edges_parquet

logger = logging.getLogger(__name__)

PLOTS_DIR = "plots"
SAMPLES_DIR = "samples"
NOT_MEASURED = "_not measured_"
GRID_COLUMNS = 8  # images per row of a sample grid


class ReportInvalid(ValueError):  # noqa: N818 (reads as what is wrong)
    """A report.json that is not a JSON object fitting RunReport; the message names every problem."""


# --------------------------------------------------------------------------------------------------------
# Numbers


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator


def fedavg_of(report: RunReport) -> FedAvgReport | None:
    """The FedAvg section, when the baseline ran."""
    fedavg = report.baselines.fedavg if report.baselines is not None else None
    return fedavg if isinstance(fedavg, FedAvgReport) else None


def personalised_of(report: RunReport) -> dict[str, PersonalisedEdge]:
    """Per personalised edge, when personalisation ran."""
    section = report.personalisation
    return section.edges if section is not None and section.enabled else {}


def quality_of(report: RunReport) -> ImageQuality | None:
    """The FID/KID section, when image quality was measured."""
    return report.image_quality if isinstance(report.image_quality, ImageQuality) else None


def kept_strategy(report: RunReport) -> str | None:
    """The strategy whose BAIM the run kept and published its task models from (the last round's `kept`;
    records written before cloud.keep existed kept the first strategy)."""
    rounds = report.cloud.rounds
    if not rounds:
        return None
    return rounds[-1].kept or next(iter(rounds[-1].strategies), None)


def baim_edge_rows(report: RunReport) -> dict[str, dict[str, Any]]:
    """Per edge whose upload the cloud accepted: bytes (upload, plus a task-model or whole-BAIM download)
    and FLOPs (local training, plus personalisation)."""
    downloads = report.downloads
    task_models = downloads.task_models if downloads is not None else {}
    generation_models = downloads.generation_models if downloads is not None else {}
    whole = downloads.baim.nbytes if downloads is not None and downloads.baim is not None else None
    personalised = personalised_of(report)
    rows: dict[str, dict[str, Any]] = {}
    for edge_id, row in report.edges.items():
        if row.upload.outcome != "accepted":
            continue
        task_bytes = task_models[row.task].nbytes if row.task in task_models else None
        generation = generation_models.get(row.task)
        generation_bytes = generation.nbytes if generation is not None else task_bytes  # else: full generates
        base = row.bytes_sent + row.bytes_received
        rows[edge_id] = {
            "task": row.task,
            "bytes_sent": row.bytes_sent,
            "bytes_received_run": row.bytes_received,
            "task_model_bytes": task_bytes,
            "baim_bytes": whole,
            "bytes_with_task_model": None if task_bytes is None else base + task_bytes,
            "generation_model_bytes": generation_bytes,
            "bytes_with_generation_model": None if generation_bytes is None else base + generation_bytes,
            "bytes_with_baim": None if whole is None else base + whole,
            "train_flops": row.flops,
            "personalise_flops": personalised[edge_id].flops if edge_id in personalised else None,
        }
    return rows


def fedavg_edge_rows(report: RunReport) -> dict[str, FedAvgEdgeRow]:
    """Per edge that took part in at least one FedAvg round (sent or received anything)."""
    fedavg = fedavg_of(report)
    if fedavg is None:
        return {}
    return {edge_id: row for edge_id, row in fedavg.edges.items() if row.bytes_sent + row.bytes_received > 0}


def fid_by(report: RunReport, phase: str, name: str | None = None) -> dict[str, float]:
    """FID per task of the sets of one phase (and name); several sets of a task are averaged."""
    quality = quality_of(report)
    per_task: dict[str, list[float]] = {}
    for row in quality.sets if quality is not None else []:
        if row.phase == phase and (name is None or row.name == name):
            per_task.setdefault(row.task, []).append(row.fid)
    return {task: sum(values) / len(values) for task, values in per_task.items()}


def headline(report: RunReport) -> dict[str, Any]:
    """The comparison that justifies the system, from report.json: means per participating edge, BAIM vs
    FedAvg, and the ratios (FedAvg / BAIM for costs; BAIM vs FedAvg side by side for quality). None where
    not measured."""
    baim_rows = baim_edge_rows(report)
    fedavg_rows = fedavg_edge_rows(report)
    fedavg = fedavg_of(report)

    def mean_of(rows: dict[str, dict[str, Any]], key: str) -> float | None:
        values = [row[key] for row in rows.values() if row[key] is not None]
        return _mean(values) if len(values) == len(rows) else None

    baim_upload = mean_of(baim_rows, "bytes_sent")
    baim_task = mean_of(baim_rows, "bytes_with_task_model")
    baim_whole = mean_of(baim_rows, "bytes_with_baim")
    baim_generation = mean_of(baim_rows, "bytes_with_generation_model")
    fedavg_bytes = _mean([row.bytes_sent + row.bytes_received for row in fedavg_rows.values()])
    baim_flops = mean_of(baim_rows, "train_flops")
    personalise_flops = mean_of(baim_rows, "personalise_flops")
    fedavg_flops = _mean([row.flops for row in fedavg_rows.values()])

    weighted = [(info.test_loss, info.test_images) for info in report.tasks.values() if info.test_loss]
    baim_loss = sum(loss * n for loss, n in weighted) / sum(n for _, n in weighted) if weighted else None
    personalised_loss = _mean([row.test_loss_after for row in personalised_of(report).values()])

    kept = kept_strategy(report)
    baim_fid = _mean(list(fid_by(report, "strategy", kept).values())) if kept else None
    fedavg_fid = _mean(list(fid_by(report, "fedavg").values()))
    cloud_flops = report.cloud.flops
    return {
        "edges_baim": len(baim_rows),
        "edges_fedavg": len(fedavg_rows),
        "bytes_per_edge": {
            "baim_upload_only": baim_upload,
            "baim_with_task_model": baim_task,
            "baim_with_whole_baim": baim_whole,
            "baim_with_generation_model": baim_generation,
            "fedavg": fedavg_bytes,
            "ratio_fedavg_over_baim_task_model": _ratio(fedavg_bytes, baim_task),
            "ratio_fedavg_over_baim_whole_baim": _ratio(fedavg_bytes, baim_whole),
            "ratio_fedavg_over_baim_generation_model": _ratio(fedavg_bytes, baim_generation),
        },
        "edge_flops_per_edge": {
            "baim_training": baim_flops,
            "baim_training_plus_personalisation": None
            if baim_flops is None or personalise_flops is None
            else baim_flops + personalise_flops,
            "fedavg": fedavg_flops,
            "ratio_fedavg_over_baim": _ratio(fedavg_flops, baim_flops),
        },
        "cloud_flops": {
            "baim_all_strategies": sum(cloud_flops.values()) if cloud_flops else None,
            "baim_kept_strategy": cloud_flops.get(kept) if kept else None,
            "fedavg": fedavg.cloud_flops if fedavg is not None else None,
        },
        "test_loss": {
            "baim_task_models": baim_loss,
            "personalised": personalised_loss,
            "fedavg": fedavg.final_test_loss if fedavg is not None else None,
        },
        "fid": {
            "baim_task_models": baim_fid,
            "edge_initial": _mean(list(fid_by(report, "edge_initial").values())),
            "personalised": _mean(list(fid_by(report, "personalised").values())),
            "fedavg": fedavg_fid,
        },
        "kept_strategy": kept,
    }


# --------------------------------------------------------------------------------------------------------
# Formatting


def _fmt_bytes(value: float | None) -> str:
    if value is None:
        return "n/a"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if value >= size:
            return f"{value / size:.2f} {unit}"
    return f"{value:.0f} B"


def _fmt_flops(value: float | None) -> str:
    if value is None:
        return "n/a"
    for unit, size in (("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if value >= size:
            return f"{value / size:.2f} {unit}"
    return f"{value:.0f} FLOP"


def _fmt(value: float | None, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:.{digits}f}"


def _fmt_ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}x"


def _table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return lines


# --------------------------------------------------------------------------------------------------------
# Plots


def _save(figure: Figure, path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(figure)
    figure.savefig(path, dpi=110, bbox_inches="tight")
    return f"{PLOTS_DIR}/{path.name}"


def load_samples(path: Path) -> np.ndarray:
    """(N, 3, H, W) uint8 images from a samples file."""
    images = load_file(str(path))["images"]
    if images.ndim != 4 or images.shape[1] != 3 or images.dtype != np.uint8:
        raise ValueError(
            f"{path}: expected uint8 images (N, 3, H, W), received {images.dtype} {images.shape}"
        )
    return images


def image_row(images: np.ndarray, columns: int = GRID_COLUMNS) -> np.ndarray:
    """The first `columns` images side by side, (H, columns * (W + 1), 3), white gaps."""
    count, _, height, width = images.shape
    row = np.full((height, columns * (width + 1), 3), 255, dtype=np.uint8)
    for i in range(min(columns, count)):
        row[:, i * (width + 1) : i * (width + 1) + width] = images[i].transpose(1, 2, 0)
    return row


def sample_rows(out_dir: Path, task: str, report: RunReport) -> list[tuple[str, Path]]:
    """(label, samples file) for every phase of one task, in the order of the paper's figure."""
    samples = out_dir / SAMPLES_DIR
    rows: list[tuple[str, Path]] = []
    candidates = [("real test images", samples / "real" / f"{task}.safetensors")]
    edges = [edge_id for edge_id, row in report.edges.items() if row.task == task]
    for edge_id in edges:
        candidates.append((f"edge {edge_id} (initial)", samples / "edge_initial" / f"{edge_id}.safetensors"))
    kept = kept_strategy(report)
    candidates.append((f"BAIM ({kept})" if kept else "BAIM", samples / "baim" / f"{task}.safetensors"))
    for path in sorted((samples / "strategy").glob(f"*__{task}.safetensors")):
        strategy = path.stem.split("__")[0]
        candidates.append((f"task model ({strategy})", path))
    for edge_id in edges:
        candidates.append(
            (f"edge {edge_id} personalised", samples / "personalised" / f"{edge_id}.safetensors")
        )
    candidates.append(("FedAvg global model", samples / "fedavg" / "global.safetensors"))
    for label, path in candidates:
        if path.is_file():
            rows.append((label, path))
    return rows


def plot_samples(out_dir: Path, report: RunReport, task: str) -> str | None:
    rows = sample_rows(out_dir, task, report)
    if len(rows) <= 1:  # real images alone are no comparison
        return None
    images = [image_row(load_samples(path)) for _, path in rows]
    height = max(image.shape[0] for image in images)
    figure = Figure(figsize=(9, 0.9 * len(rows) * max(1.0, height / 32)))
    axes = figure.subplots(len(rows), 1, squeeze=False)[:, 0]
    for ax, (label, _), image in zip(axes, rows, images, strict=True):
        ax.imshow(image, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
    figure.suptitle(f"Samples, task {task!r}", fontsize=10)
    return _save(figure, out_dir / PLOTS_DIR / f"samples_{task}.png")


def strategy_curves(report: RunReport) -> dict[str, list[tuple[int, float]]]:
    """(cloud epoch, test loss) per strategy, rounds concatenated; epoch 0 is the fused BAIM before
    training, present when the round measured it."""
    curves: dict[str, list[tuple[int, float]]] = {}
    epochs_done: dict[str, int] = {}
    for cloud_round in report.cloud.rounds:
        for strategy, summary in cloud_round.strategies.items():
            curve = curves.setdefault(strategy, [])
            done = epochs_done.get(strategy, 0)
            initial = summary.initial_test_loss if isinstance(summary, RayTrainStrategyRun) else None
            if done == 0 and initial is not None:
                curve.append((0, initial))
            losses = summary.test_loss  # None: an epoch the round did not evaluate
            curve.extend((done + i + 1, loss) for i, loss in enumerate(losses) if loss is not None)
            epochs_done[strategy] = done + len(losses)
    return {strategy: curve for strategy, curve in curves.items() if curve}


def plot_losses(out_dir: Path, report: RunReport) -> str | None:
    curves = strategy_curves(report)
    fedavg = fedavg_of(report)
    fedavg_curve: list[tuple[int, float]] = []
    if fedavg is not None:
        if fedavg.initial_test_loss is not None:
            fedavg_curve.append((0, fedavg.initial_test_loss))
        fedavg_curve += [(r.round, r.test_loss) for r in fedavg.rounds if r.test_loss]
    if not curves and not fedavg_curve:
        return None
    figure = Figure(figsize=(10, 3.6))
    left, right = figure.subplots(1, 2)
    for strategy, curve in curves.items():
        left.plot([e for e, _ in curve], [loss for _, loss in curve], marker="o", label=strategy)
    left.set_xlabel("cloud epoch (0 = fused BAIM before training)")
    left.set_ylabel("test loss")
    left.set_title("BAIM training strategies")
    if curves:
        left.legend()
    if fedavg_curve:
        right.plot([r for r, _ in fedavg_curve], [loss for _, loss in fedavg_curve], marker="s",
                   color="tab:red", label="FedAvg")  # fmt: skip
        right.legend()
    right.set_xlabel("FedAvg round (0 = initial global model)")
    right.set_title("FedAvg global model")
    for ax in (left, right):
        ax.grid(alpha=0.3)
    return _save(figure, out_dir / PLOTS_DIR / "test_loss.png")


def _number(rows: dict[str, dict[str, Any]], edge_id: str, key: str) -> float:
    """rows[edge_id][key] for a bar, 0 when the edge has no row or the value was not measured."""
    value = rows[edge_id][key] if edge_id in rows else None
    return 0 if value is None else value


def plot_costs(out_dir: Path, report: RunReport) -> str | None:
    baim_rows = baim_edge_rows(report)
    fedavg_rows = fedavg_edge_rows(report)
    edges = sorted(set(baim_rows) | set(fedavg_rows))
    if not edges:
        return None
    figure = Figure(figsize=(12, 3.8))
    bytes_ax, flops_ax, cloud_ax = figure.subplots(1, 3, gridspec_kw={"width_ratios": [3, 3, 2]})
    x = np.arange(len(edges))
    series: list[tuple[str, list[float]]] = [
        ("BAIM sent", [_number(baim_rows, e, "bytes_sent") for e in edges]),
        ("BAIM received (task model)", [_number(baim_rows, e, "task_model_bytes") for e in edges]),
        ("FedAvg sent", [fedavg_rows[e].bytes_sent if e in fedavg_rows else 0 for e in edges]),
        ("FedAvg received", [fedavg_rows[e].bytes_received if e in fedavg_rows else 0 for e in edges]),
    ]
    width = 0.8 / len(series)
    for i, (label, values) in enumerate(series):
        bytes_ax.bar(x + (i - 1.5) * width, [max(v, 1) for v in values], width, label=label)
    bytes_ax.set_yscale("log")
    bytes_ax.set_title("bytes per edge")
    flop_series: list[tuple[str, list[float]]] = [
        ("BAIM training", [_number(baim_rows, e, "train_flops") for e in edges]),
        ("BAIM personalisation", [_number(baim_rows, e, "personalise_flops") for e in edges]),
        ("FedAvg", [fedavg_rows[e].flops if e in fedavg_rows else 0 for e in edges]),
    ]
    width = 0.8 / len(flop_series)
    for i, (label, values) in enumerate(flop_series):
        flops_ax.bar(x + (i - 1) * width, [max(v, 1) for v in values], width, label=label)
    flops_ax.set_yscale("log")
    flops_ax.set_title("edge FLOPs per edge")
    for ax in (bytes_ax, flops_ax):
        if len(edges) <= EDGE_TABLE_LIMIT:
            ax.set_xticks(x)
            ax.set_xticklabels(edges, rotation=45, ha="right", fontsize=7)
        else:
            ax.set_xlabel(f"{len(edges):,} edges (ids in {EDGES_PARQUET})")
        ax.legend(fontsize=7)
    cloud = dict(report.cloud.flops)
    fedavg = fedavg_of(report)
    if fedavg is not None:
        cloud["fedavg"] = fedavg.cloud_flops
    names = list(cloud)
    cloud_ax.bar(names, [max(cloud[n], 1) for n in names], color="tab:gray")
    cloud_ax.set_yscale("log")
    cloud_ax.set_title("cloud FLOPs (fedavg: aggregation only)", fontsize=9)
    return _save(figure, out_dir / PLOTS_DIR / "costs.png")


def plot_fid(out_dir: Path, report: RunReport) -> str | None:
    quality = quality_of(report)
    rows = quality.sets if quality is not None else []
    if not rows:
        return None
    tasks = sorted({row.task for row in rows})
    figure = Figure(figsize=(5 * len(tasks), 3.8))
    axes = figure.subplots(1, len(tasks), squeeze=False)[0]
    for ax, task in zip(axes, tasks, strict=True):
        task_rows = [row for row in rows if row.task == task]
        labels = [f"{row.phase}\n{row.name}" for row in task_rows]
        colours = {"edge_initial": "tab:blue", "strategy": "tab:green", "personalised": "tab:orange"}
        ax.bar(labels, [row.fid for row in task_rows],
               color=[colours.get(row.phase, "tab:red") for row in task_rows])  # fmt: skip
        ax.set_title(f"FID, task {task!r} (lower is better)", fontsize=9)
        ax.tick_params(axis="x", labelsize=6, rotation=60)
    return _save(figure, out_dir / PLOTS_DIR / "fid.png")


# --------------------------------------------------------------------------------------------------------
# Sections


def _failure_section(report: RunReport) -> list[str]:
    """Why the run failed and which cloud rounds failed; empty for a clean run (the section is then left out).

    At the top of the page: a failed round means the task models are missing or leave learners untrained,
    so every number below must be read with that in mind.
    """
    errors = report.cloud.round_errors
    if not report.failure and not errors:
        return []
    lines = [f"**The run failed:** {' '.join(report.failure.split())}", ""] if report.failure else []
    if errors:
        lines.append(
            "Cloud rounds that failed (a failed round keeps its learners pending; they are retried after a "
            "new upload or `cloud.fusion.max_wait_seconds`):"
        )
        lines.append("")
        rows = [
            [e.round, e.attempts, ", ".join(e.learners), e.error.replace("|", "\\|").replace("\n", " ")]
            for e in errors
        ]
        lines += _table(["round", "attempts", "learners", "last error"], rows)
    return lines


def _data_section(report: RunReport) -> list[str]:
    data = report.data
    what = "real CelebA faces" if data.kind == "celeba" else "procedural faces (no CelebA found)"
    lines = [f"- Data: **{what}** from `{data.root}`, {data.resolution} px square."]
    if data.shards:
        sizes = ", ".join(f"{group} {sum(v.values())}" for group, v in data.shards.items())
        lines.append(f"- Images per split: {sizes} (all disjoint).")
    return lines


def _headline_section(numbers: dict[str, Any]) -> list[str]:
    b, f, c = numbers["bytes_per_edge"], numbers["edge_flops_per_edge"], numbers["cloud_flops"]
    t, q = numbers["test_loss"], numbers["fid"]
    rows = [
        ["bytes per edge, BAIM upload + task-model download", _fmt_bytes(b["baim_with_task_model"]),
         _fmt_bytes(b["fedavg"]), _fmt_ratio(b["ratio_fedavg_over_baim_task_model"])],
        ["bytes per edge, BAIM upload + generation-artifact download",
         _fmt_bytes(b["baim_with_generation_model"]), _fmt_bytes(b["fedavg"]),
         _fmt_ratio(b["ratio_fedavg_over_baim_generation_model"])],
        ["bytes per edge, BAIM upload + whole-BAIM download", _fmt_bytes(b["baim_with_whole_baim"]),
         _fmt_bytes(b["fedavg"]), _fmt_ratio(b["ratio_fedavg_over_baim_whole_baim"])],
        ["edge FLOPs per edge (training)", _fmt_flops(f["baim_training"]), _fmt_flops(f["fedavg"]),
         _fmt_ratio(f["ratio_fedavg_over_baim"])],
        ["edge FLOPs per edge (+ personalisation)", _fmt_flops(f["baim_training_plus_personalisation"]),
         _fmt_flops(f["fedavg"]),
         _fmt_ratio(_ratio(f["fedavg"], f["baim_training_plus_personalisation"]))],
        ["cloud FLOPs (all strategies / FedAvg aggregation)", _fmt_flops(c["baim_all_strategies"]),
         _fmt_flops(c["fedavg"]), ""],
        ["test loss (BAIM task models / FedAvg global)", _fmt(t["baim_task_models"]), _fmt(t["fedavg"]), ""],
        ["test loss, personalised edge models", _fmt(t["personalised"]), "", ""],
        ["FID (BAIM task models / FedAvg global)", _fmt(q["baim_task_models"], 1), _fmt(q["fedavg"], 1), ""],
        ["FID, edge initial / personalised models", _fmt(q["edge_initial"], 1), _fmt(q["personalised"], 1),
         ""],
    ]  # fmt: skip
    lines = _table(["measure", "BAIM", "FedAvg", "FedAvg / BAIM"], rows)
    lines.append("")
    lines.append(
        f"Means per participating edge ({numbers['edges_baim']} BAIM edges with an accepted upload, "
        f"{numbers['edges_fedavg']} FedAvg clients). Task models come from the `{numbers['kept_strategy']}` "
        "strategy (the one the run published). FID means are over tasks; test losses are weighted by test "
        "images. The BAIM loss also carries its gate's KL term (weight `kld_weight`), FedAvg's does not."
    )
    return lines


def _admission_lines(report: RunReport) -> list[str]:
    """Per task: the accepted uploads whose learner the BAIM admitted, those kept only in the registry, and
    those model-level pruning removed after the round."""
    counts: dict[str, collections.Counter[str]] = {}
    for record in report.uploads:
        row = report.edges.get(str(record.edge_id))
        if record.admission is not None and row is not None:
            counts.setdefault(row.task, collections.Counter())[record.admission] += 1
    if not counts:
        return []
    bound = report.scenario.cloud.max_learners_per_task
    rows = [[task, c["admitted"], c["registry_only"], c["pruned"]] for task, c in sorted(counts.items())]
    return [
        "",
        f"Accepted uploads by admission into the BAIM (cloud.max_learners_per_task: {bound or 'unbounded'}):",
        "",
        *_table(["task", "admitted", "kept only in the registry", "pruned after the round"], rows),
    ]


def _edges_section(report: RunReport) -> list[str]:
    baim_rows = baim_edge_rows(report)
    fedavg_rows = fedavg_edge_rows(report)
    if not report.edges:
        return [NOT_MEASURED]
    if len(report.edges) > EDGE_TABLE_LIMIT:
        return edges_summary(report, _fmt_bytes, _fmt_flops, _table) + _admission_lines(report)
    rows = []
    for edge_id, row in report.edges.items():
        task_model_bytes = baim_rows[edge_id]["task_model_bytes"] if edge_id in baim_rows else None
        fedavg = fedavg_rows.get(edge_id)
        rows.append([
            edge_id, row.task, row.status, _fmt_bytes(row.bytes_sent), _fmt_bytes(task_model_bytes),
            _fmt_flops(row.flops),
            _fmt_bytes(fedavg.bytes_sent if fedavg else None),
            _fmt_bytes(fedavg.bytes_received if fedavg else None),
            _fmt_flops(fedavg.flops if fedavg else None),
        ])  # fmt: skip
    header = ["edge", "task", "BAIM status", "BAIM sent", "BAIM task-model download", "BAIM FLOPs",
              "FedAvg sent", "FedAvg received", "FedAvg FLOPs"]  # fmt: skip
    return _table(header, rows) + _admission_lines(report)


def _tasks_section(report: RunReport) -> list[str]:
    if not report.tasks:
        return [NOT_MEASURED + " (no task models were published)"]
    rows = [
        [task, f"{info.params:,}", f"{info.baim_params:,}", _fmt_share(info.params, info.baim_params),
         _fmt_share(info.params, info.squad_params), _fmt_count(info.budget_params), _fmt(info.test_loss),
         f"{info.decomposition_max_abs_diff:.2e}", ", ".join(info.learners)]
        for task, info in report.tasks.items()
    ]  # fmt: skip
    lines = _table(
        ["task", "params", "BAIM params", "/ BAIM", "/ squad", "budget (params)", "test loss",
         "decomposition max abs diff", "learners"],
        rows,
    )  # fmt: skip
    downloads = report.downloads
    if downloads is not None:
        kinds = [*downloads.task_models.values(), *downloads.generation_models.values()]
        if downloads.baim is not None:
            kinds.append(downloads.baim)
        lines += ["", "What an edge downloads (kind: full to reconstruct and personalise, generation to "
                  "generate):", ""]  # fmt: skip
        lines += _table(
            ["artifact", "kind", "bytes", "params"],
            [[d.artifact, d.kind, _fmt_bytes(d.nbytes), _fmt_count(d.params)] for d in kinds],
        )
    return lines


def _fmt_share(part: int, whole: int | None) -> str:
    return "n/a" if not whole else f"{part / whole:.3f}"


def _fmt_count(value: int | None) -> str:
    return "n/a" if value is None else f"{value:,}"


def _strategies_section(report: RunReport) -> list[str]:
    curves = strategy_curves(report)
    if not curves:
        return [NOT_MEASURED + " (no cloud training round)"]
    flops, seconds = report.cloud.flops, report.cloud.seconds
    trainers = strategy_trainers(report)
    rows = [
        [s, curve[0][0], _fmt(curve[0][1]), curve[-1][0], _fmt(curve[-1][1]), _fmt_flops(flops.get(s)),
         _fmt(seconds.get(s), 1), trainers.get(s, "")]
        for s, curve in curves.items()
    ]  # fmt: skip
    header = ["strategy", "first epoch", "test loss", "last epoch", "test loss", "cloud FLOPs", "seconds",
              "trainer (why)"]  # fmt: skip
    return _table(header, rows)


def strategy_trainers(report: RunReport) -> dict[str, str]:
    """Per strategy, which runner trained its rounds and why, e.g. `local (cloud.trainer: auto (...))`;
    rounds that differ are listed in order, `; `-separated."""
    named: dict[str, list[str]] = {}
    for cloud_round in report.cloud.rounds:
        for strategy, summary in cloud_round.strategies.items():
            text = f"{summary.runner} ({summary.chosen_by})"
            seen = named.setdefault(strategy, [])
            if text not in seen:
                seen.append(text)
    return {strategy: "; ".join(texts) for strategy, texts in named.items()}


def _fedavg_section(report: RunReport) -> list[str]:
    fedavg = fedavg_of(report)
    if fedavg is None or not fedavg.rounds:
        disabled = report.baselines is not None and fedavg is None
        return [NOT_MEASURED + (" (disabled in the scenario)" if disabled else "")]
    model = fedavg.model
    lines = [
        f"One homogeneous VAE (widths {model.widths}, latent {model.latent_dim}, "
        f"{fedavg.params:,} parameters), {fedavg.rounds_planned} rounds x "
        f"{fedavg.local_epochs} local epochs, client fraction {fedavg.client_fraction}, "
        f"averaging weighted by {fedavg.weighting}.",
        "",
    ]
    rows = []
    for r in fedavg.rounds:
        failures = ", ".join(f"{f.edge} ({f.reason})" for f in r.failures) or "none"
        rows.append([r.round, len(r.selected), len(r.aggregated), failures, _fmt(r.test_loss),
                     _fmt_bytes(r.global_model_bytes), _fmt(r.seconds, 1)])  # fmt: skip
    header = ["round", "selected", "averaged", "failed (reason)", "test loss", "global model", "seconds"]
    return lines + _table(header, rows)


def _personalisation_section(report: RunReport) -> list[str]:
    section = report.personalisation
    if section is None or not section.enabled or not section.edges:
        return [NOT_MEASURED]
    rows = [
        [e, row.task, row.model_version, _fmt_bytes(row.bytes_received), row.method, row.trainable_params,
         _fmt_bytes(row.upload_bytes), row.epochs, _fmt(row.test_loss_before), _fmt(row.test_loss_after),
         _fmt_flops(row.flops)]
        for e, row in section.edges.items()
    ]  # fmt: skip
    header = ["edge", "task", "model", "downloaded", "method", "trained params", "to relay", "epochs",
              "test loss before", "after", "FLOPs"]  # fmt: skip
    return [f"Measured in the {section.where}.", "", *_table(header, rows)]


def _relay_section(report: RunReport) -> list[str]:
    section = report.relay
    if section is None or not section.enabled:
        return [NOT_MEASURED]

    def rejected(reasons: dict[str, str]) -> str:
        return ", ".join(f"{edge}: {why[:80]}" for edge, why in reasons.items()) or "none"

    rows = [
        [task, ", ".join(row.folded) or "none", rejected(row.rejected), _fmt_bytes(row.upload_bytes),
         _fmt(row.test_loss_before, 5), _fmt(row.candidate_test_loss, 5), _fmt(row.test_loss_after, 5)]
        for task, row in section.tasks.items()
    ]  # fmt: skip
    header = ["task", "adapters taken in", "rejected (reason)", "bytes relayed", "test loss before",
              "candidate", "kept"]  # fmt: skip
    how = (
        f"{section.distil_epochs} epochs of distillation on cloud data"
        if section.method == "distil"
        else f"then {section.gate_epochs} epochs of gate training on cloud data"
    )
    lines = [f"Method `{section.method}`, measured in the {section.where}; {how}."]
    if section.guarded:
        held = ", ".join(
            f"{task} {_fmt(loss, 5)} -> {_fmt(section.holdout_loss_after.get(task), 5)}"
            for task, loss in section.holdout_loss_before.items()
        )
        verdict = "accepted" if section.accepted else "rejected (a held-out loss rose; the BAIM is unchanged)"
        lines.append(f"Guarded: {verdict}; held-out loss {held}.")
    if section.baim_version is not None:
        published = ", ".join(section.task_versions.values())
        lines.append(f"Published as {BAIM_OWNER}@{section.baim_version} with {published}.")
    if section.distillation_loss_before is not None and section.distillation_loss_after is not None:
        lines.append(
            "Distillation loss (student vs teachers, cloud batches): "
            f"{_fmt(section.distillation_loss_before, 5)} -> {_fmt(section.distillation_loss_after, 5)}."
        )
    return [" ".join(lines), "", *_table(header, rows)]


def _placements_section(report: RunReport) -> list[str]:
    section = report.placements
    if section is None or not section.enabled:
        return [NOT_MEASURED]
    lines = []
    for edge_id, edge in section.edges.items():
        lines += [
            f"**{edge_id}** ({edge.task}): {edge.users} users, {edge.requests_per_second:g} requests/s of "
            f"{edge.images_per_request} images; the cost model chooses **{edge.chosen}**.",
            "",
        ]
        rows = [
            [p.name, _fmt_flops(p.edge_flops), _fmt_flops(p.cloud_flops), _fmt_bytes(p.uplink_bytes),
             _fmt_bytes(p.downlink_bytes), f"{p.latency_s * 1000:.1f}", f"{p.edge_utilisation:.3f}"]
            for p in edge.placements
        ]  # fmt: skip
        header = ["placement", "edge FLOPs", "cloud FLOPs", "up", "down", "latency ms", "edge load"]
        lines += [*_table(header, rows), ""]
    return lines


def _quality_section(report: RunReport) -> list[str]:
    quality = report.image_quality
    if quality is None or not quality.enabled:
        return [NOT_MEASURED + (f" ({quality.reason})" if quality is not None and quality.reason else "")]
    lines = [
        f"Extractor `{quality.extractor}` ({quality.feature_dim}-d features); "
        f"{quality.num_generated} generated images per set against the task's real test images "
        f"({', '.join(f'{t}: {n}' for t, n in quality.num_real.items())}); "
        f"KID over {quality.kid_subsets} random subsets of half of each set. "
        "FID is biased upward at these sample counts: compare numbers within this table, and read KID beside "
        "it. The real-vs-real line is the floor at this sample count (two disjoint halves of the real set).",
        "",
    ]
    rows = [
        [row.task, row.phase, row.name, _fmt(row.fid, 1), f"{row.kid_mean:.4f} ± {row.kid_std:.4f}",
         row.num_generated, row.num_real]
        for row in quality.sets
    ]  # fmt: skip
    for task, ref in quality.real_reference.items():
        rows.append([task, "real vs real", "halves", _fmt(ref.fid_real_half_vs_half, 1), "",
                     ref.num_per_half, ref.num_per_half])  # fmt: skip
    return lines + _table(["task", "phase", "model", "FID", "KID", "generated", "real"], rows)


def build_markdown(out_dir: Path, report: RunReport) -> str:
    """report.md's text; writes the plots it links under out_dir/plots/."""
    scenario = report.scenario
    numbers = headline(report)
    measured = (
        f", {_fmt(sum(report.evaluation.seconds.values()), 0)} s for the baseline and measurements."
        if report.evaluation is not None
        else "."
    )
    lines = [
        f"# Run report: {scenario.name}",
        "",
        f"Scenario `{scenario.name}`, seed {report.seed}, "
        f"wall time {_fmt(report.totals.wall_seconds, 0)} s for the BAIM run"
        + (
            f" ({_fmt(report.totals.simulated_seconds, 1)} s simulated on the virtual clock)"
            if report.totals.simulated_seconds is not None
            else ""
        )
        + measured,
        *_data_section(report),
        "",
    ]
    failure_lines = _failure_section(report)
    if failure_lines:
        lines += ["## Failures", "", *failure_lines, ""]
    lines += [
        "## Headline: BAIM vs FedAvg",
        "",
        *_headline_section(numbers),
        "",
    ]
    plots: list[tuple[str, str | None]] = []
    for task in scenario.task_names():
        plots.append((f"Samples, task {task}", _try_plot(plot_samples, out_dir, report, task)))
    plots.append(("Test loss", _try_plot(plot_losses, out_dir, report)))
    plots.append(("Bytes and FLOPs", _try_plot(plot_costs, out_dir, report)))
    plots.append(("FID", _try_plot(plot_fid, out_dir, report)))
    lines += ["## Figures", ""]
    for title, link in plots:
        lines += [f"### {title}", "", f"![{title}]({link})" if link else NOT_MEASURED, ""]
    sections = [
        ("Image quality (FID / KID)", _quality_section(report)),
        ("Cloud training strategies", _strategies_section(report)),
        ("Task models", _tasks_section(report)),
        ("Edges: BAIM vs FedAvg", _edges_section(report)),
        ("FedAvg baseline", _fedavg_section(report)),
        ("Personalisation", _personalisation_section(report)),
        ("Relay: adapters back to the cloud", _relay_section(report)),
        ("Placements of end users' requests", _placements_section(report)),
        ("Lifecycle: continual rounds, new tasks, pruned learners", lifecycle_section(report)),
    ]
    for title, body in sections:
        lines += [f"## {title}", "", *body, ""]
    lines += [
        "Rebuild this page and its plots from report.json with `baim report DIR`.",
        "",
    ]
    return "\n".join(lines)


def _try_plot(plot: Callable[..., str | None], *args: Any) -> str | None:
    """A figure whose sample files are malformed is left out (logged), not allowed to sink the report."""
    try:
        return plot(*args)
    except (KeyError, TypeError, ValueError, OSError) as err:
        logger.warning("report: %s not drawn: %s: %s", plot.__name__, type(err).__name__, err)
        return None


def read_report(path: Path) -> RunReport:
    """report.json, validated. Raises FileNotFoundError when it is missing and ReportInvalid (a ValueError
    naming every problem by field path) when it is not a report."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no report.json in {path.parent} (run `baim run` first)")
    raw = path.read_bytes()
    try:
        version = json.loads(raw).get("format_version")
    except (ValueError, AttributeError):
        version = None  # not JSON, or not an object: the validation below names it
    if isinstance(version, int) and version != REPORT_FORMAT_VERSION:
        raise ReportInvalid(
            f"{path}: report.json format_version {version}, and this version reads {REPORT_FORMAT_VERSION}: "
            "rerun the scenario with this version (`baim run`) or read it with the version that wrote it"
        )
    try:
        return RunReport.model_validate_json(raw)
    except ValidationError as err:
        problems = format_validation_error(err)
        raise ReportInvalid("\n".join([f"{path}: not a report.json of this version:", *problems])) from None


def write_report_markdown(out_dir: str | Path) -> Path:
    """Read out_dir/report.json, write out_dir/report.md and out_dir/plots/*.png; return report.md's path
    (errors: see `read_report`)."""
    out = Path(out_dir)
    report = read_report(out / "report.json")
    write_edges_parquet(report, out)
    markdown = build_markdown(out, report)
    target = out / "report.md"
    target.write_text(markdown, encoding="utf-8")
    logger.info("wrote %s", target)
    return target
