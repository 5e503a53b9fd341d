"""report.md and report.html of `baim compare` from comparison.json (`write_comparison_report`).

One list of blocks (headings, paragraphs, tables, images) is rendered twice: as Markdown that links the PNGs
under DIR/plots/ and DIR/samples/, and as one HTML file with every image inlined as a data URI (it opens
offline, alone). Plots use matplotlib's object API (no pyplot state, no display).
"""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from orchestrator.core.comparison import Comparison, CurvePoint, MethodCurve
from orchestrator.report.markdown import _fmt as fmt
from orchestrator.report.markdown import _fmt_bytes as fmt_bytes
from orchestrator.report.markdown import _fmt_flops as fmt_flops
from orchestrator.report.time_to_quality import best_point

PLOTS_DIR = "plots"
PLOT_NAMES = ("loss_vs_bytes", "loss_vs_edge_flops", "fid_vs_bytes")
STYLE = {  # family -> (marker, line style)
    "baim": ("o", "-"),
    "cloud_only": ("s", "--"),
    "fedavg": ("^", "-"),
    "fedavg_finetune": ("v", "-."),
    "edge_alone": ("x", ""),
    "centralised": ("*", ":"),
}


@dataclass(frozen=True)
class Heading:
    text: str
    level: int = 2


@dataclass(frozen=True)
class Paragraph:
    text: str


@dataclass(frozen=True)
class Table:
    header: Sequence[str]
    rows: Sequence[Sequence[object]]


@dataclass(frozen=True)
class Image:
    alt: str
    path: str  # relative to the output folder


Block = Heading | Paragraph | Table | Image


# --------------------------------------------------------------------------------------------------------
# Plots


def _save(figure: Figure, out_dir: Path, name: str) -> str:
    path = out_dir / PLOTS_DIR / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(figure)
    figure.savefig(path, dpi=110, bbox_inches="tight")
    return f"{PLOTS_DIR}/{path.name}"


def _plot_curves(
    out_dir: Path, comparison: Comparison, name: str, x_of: str, x_label: str, title: str
) -> tuple[str, list[str]]:
    """Test loss against a cost, one line per method (log x); methods at 0 on that axis are listed instead."""
    figure = Figure(figsize=(7.5, 4.8))
    axes = figure.add_subplot()
    off_axis: list[str] = []
    for curve in comparison.methods:
        points = [p for p in curve.points if p.test_loss is not None and getattr(p, x_of) > 0]
        if not points:
            off_axis.append(curve.label)
            continue
        marker, line = STYLE[curve.family]
        axes.plot(
            [getattr(p, x_of) for p in points],
            [p.test_loss or 0.0 for p in points],  # filtered above: never None
            marker=marker,
            linestyle=line or "none",
            label=curve.label,
        )
    axes.set_xscale("log")
    axes.set_xlabel(x_label)
    axes.set_ylabel("test loss (mean over the tasks it covers)")
    axes.set_title(title)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=7, loc="best")
    return _save(figure, out_dir, name), off_axis


def _plot_fid(out_dir: Path, comparison: Comparison) -> str | None:
    figure = Figure(figsize=(7.5, 4.8))
    axes = figure.add_subplot()
    drawn = 0
    for curve in comparison.methods:
        for point in curve.points:
            if not point.quality or point.bytes_per_edge <= 0:
                continue
            marker, _ = STYLE[curve.family]
            fid = sum(q.fid for q in point.quality) / len(point.quality)
            axes.scatter([point.bytes_per_edge], [fid], marker=marker, label=curve.label)
            drawn += 1
    if drawn == 0:
        return None
    axes.set_xscale("log")
    axes.set_xlabel("bytes per edge (sent + received, log)")
    axes.set_ylabel(f"FID ({comparison.image_quality.extractor}), mean over tasks")
    axes.set_title(
        f"Image quality of each method's final model ({comparison.image_quality.num_samples} samples)"
    )
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=7, loc="best")
    return _save(figure, out_dir, "fid_vs_bytes")


# --------------------------------------------------------------------------------------------------------
# Blocks


def _final(curve: MethodCurve) -> CurvePoint | None:
    return curve.points[-1] if curve.points else None


def _mean_fid(point: CurvePoint | None) -> str:
    if point is None or not point.quality:
        return "n/a"
    return f"{sum(q.fid for q in point.quality) / len(point.quality):.1f}"


def _ttq_blocks(comparison: Comparison) -> list[Block]:
    table = comparison.time_to_quality
    if table is None:
        return [Heading("Time to quality"), Paragraph("Not measured: no BAIM curve to take the target from.")]
    per_task = ", ".join(f"{task} {loss:.5f}" for task, loss in table.target_per_task.items())
    rows = []
    for row in table.rows:
        if row.reached:
            rows.append(
                [
                    row.label,
                    fmt(row.target_loss, 5),
                    f"{row.step_name} {row.step}",
                    fmt_bytes(row.bytes_per_edge),
                    fmt_bytes(row.bytes_sent_per_edge),
                    fmt_flops(row.edge_flops_per_edge),
                    fmt_flops(row.cloud_flops),
                    f"{row.wall_seconds:.1f}",
                    fmt(row.best_loss, 5),
                ]
            )
        else:
            rows.append(
                [
                    row.label,
                    fmt(row.target_loss, 5),
                    f"not reached within cap {row.cap} ({row.step_name}s)",
                    "",
                    "",
                    "",
                    "",
                    "",
                    fmt(row.best_loss, 5),
                ]
            )
    return [
        Heading("Time to quality (headline)"),
        Paragraph(
            f"Target test loss {table.target_loss:.5f} ({table.target_source}; per task: {per_task}). "
            "A method "
            "reaches it at its first measured point at or below it (no interpolation); a method covering "
            "one task (an edge alone) is held to that task's target. Bytes are per edge, sent + received."
        ),
        Table(
            [
                "method",
                "target",
                "reached at",
                "bytes/edge",
                "sent/edge",
                "edge FLOPs/edge",
                "cloud FLOPs",
                "seconds",
                "best loss",
            ],
            rows,
        ),
    ]


def _goal_blocks(comparison: Comparison) -> list[Block]:
    goal = comparison.goal
    if goal is None:
        return [Heading("Goal"), Paragraph("Not measured: the compare ran no FedAvg or no BAIM curve.")]
    return [
        Heading("Goal: FedAvg's converged loss at >= 20x fewer bytes and >= 10x fewer edge FLOPs"),
        Paragraph(f"Measured: {goal.text}."),
    ]


def _methods_blocks(comparison: Comparison) -> list[Block]:
    rows = []
    for curve in comparison.methods:
        final, best = _final(curve), best_point(curve.points)
        rows.append(
            [
                curve.label + (" (privacy-violating)" if curve.privacy_violating else ""),
                f"{len(curve.points)} ({curve.step_name}s, cap {curve.cap}, {curve.stop_reason})",
                fmt_bytes(final.bytes_per_edge) if final else "n/a",
                fmt_flops(final.edge_flops_per_edge) if final else "n/a",
                fmt_flops(final.cloud_flops) if final else "n/a",
                fmt(final.test_loss, 5) if final else "n/a",
                f"{fmt(best.test_loss, 5)} at {best.step}" if best else "n/a",
                _mean_fid(final),
            ]
        )
    notes = [f"{c.label}: {c.description}. {c.note}".strip() for c in comparison.methods]
    return [
        Heading("Every method, at its last point"),
        Table(
            [
                "method",
                "points",
                "bytes/edge",
                "edge FLOPs/edge",
                "cloud FLOPs",
                "final test loss",
                "best test loss",
                "FID",
            ],
            rows,
        ),
        Paragraph("What each method is: " + " | ".join(notes)),
    ]


def _curve_table(curve: MethodCurve, tasks: Sequence[str]) -> Table:
    rows = []
    for p in curve.points:
        rows.append(
            [
                p.step,
                fmt_bytes(p.bytes_per_edge),
                fmt_flops(p.edge_flops_per_edge),
                fmt_flops(p.cloud_flops),
                f"{p.wall_seconds:.1f}",
                fmt(p.test_loss, 5),
            ]
            + [fmt(p.test_loss_per_task.get(task), 5) for task in tasks]
        )
    return Table(
        [curve.step_name, "bytes/edge", "edge FLOPs/edge", "cloud FLOPs", "seconds", "test loss"]
        + [f"loss {task}" for task in tasks],
        rows,
    )


def _curves_blocks(comparison: Comparison) -> list[Block]:
    tasks = list(comparison.test_images)
    blocks: list[Block] = [Heading("Curves")]
    for curve in comparison.methods:
        if curve.family == "edge_alone":
            continue
        blocks += [Heading(curve.label, 3), _curve_table(curve, tasks)]
    edges = [c for c in comparison.methods if c.family == "edge_alone"]
    if edges:
        rows = [
            [
                c.label,
                c.tasks[0],
                c.points[0].step,
                fmt(c.points[0].test_loss, 5),
                fmt_flops(c.points[0].edge_flops_per_edge),
                _mean_fid(c.points[0]),
                c.note,
            ]
            for c in edges
        ]
        blocks += [
            Heading("Each edge alone (its own test loss)", 3),
            Table(
                ["edge", "task", "local epochs", "test loss (own task)", "edge FLOPs", "FID", "training"],
                rows,
            ),
        ]
    return blocks


def _conclusion_blocks(comparison: Comparison) -> list[Block]:
    """Sentences that state what the curves show, computed from them (no claim the numbers do not make)."""
    lines = []
    for curve in comparison.methods:
        best = best_point(curve.points)
        if best is None or curve.family == "edge_alone":
            continue
        last = curve.points[-1]
        flat = ""
        if len(curve.points) >= 3 and last.test_loss is not None and curve.points[-2].test_loss is not None:
            change = (curve.points[-2].test_loss - last.test_loss) / curve.points[-2].test_loss
            flat = f"; the last step changed the loss by {-100 * change:+.1f}%"
        lines.append(
            f"{curve.label}: best test loss {best.test_loss:.5f} at {curve.step_name} {best.step} "
            f"({fmt_bytes(best.bytes_per_edge)} per edge, {fmt_flops(best.edge_flops_per_edge)} edge FLOPs), "
            f"curve ended by {curve.stop_reason}{flat}."
        )
    return [Heading("What the curves show"), *[Paragraph(line) for line in lines]]


def _plot_blocks(out_dir: Path, comparison: Comparison) -> list[Block]:
    blocks: list[Block] = [Heading("Plots")]
    path, off = _plot_curves(
        out_dir,
        comparison,
        "loss_vs_bytes",
        "bytes_per_edge",
        "bytes per edge, sent + received (log)",
        "Test loss vs bytes per edge",
    )
    blocks.append(Image("test loss vs bytes per edge", path))
    if off:
        blocks.append(Paragraph(f"Not on this log axis (0 bytes per edge): {', '.join(off)}."))
    path, off = _plot_curves(
        out_dir,
        comparison,
        "loss_vs_edge_flops",
        "edge_flops_per_edge",
        "edge FLOPs per edge (log)",
        "Test loss vs edge FLOPs",
    )
    blocks.append(Image("test loss vs edge FLOPs", path))
    if off:
        blocks.append(Paragraph(f"Not on this log axis (0 edge FLOPs): {', '.join(off)}."))
    fid = _plot_fid(out_dir, comparison)
    if fid is None:
        reason = comparison.image_quality.reason or "no method's final model was measured"
        blocks.append(Paragraph(f"FID vs bytes: not measured ({reason})."))
    else:
        blocks.append(Image("FID vs bytes per edge", fid))
    return blocks


def _sample_blocks(out_dir: Path, comparison: Comparison) -> list[Block]:
    blocks: list[Block] = [Heading("Samples (one grid per method; rows: one block per task)")]
    if (out_dir / "samples" / "real.png").exists():
        blocks += [Heading("real test images", 3), Image("real test images", "samples/real.png")]
    for curve in comparison.methods:
        if curve.samples is not None:
            blocks += [Heading(curve.label, 3), Image(f"samples of {curve.label}", curve.samples)]
    return blocks


def comparison_blocks(out_dir: Path, comparison: Comparison) -> list[Block]:
    quality = comparison.image_quality
    quality_text = (
        f"FID/KID with {quality.extractor}, {quality.num_samples} generated vs {quality.num_samples} real "
        "test "
        "images per task (biased upward at this count; real-vs-real floor: "
        + ", ".join(f"{t} {v:.1f}" for t, v in quality.real_floor.items())
        + ")"
        if quality.enabled
        else f"FID/KID not measured ({quality.reason})"
    )
    phases = ", ".join(f"{name} {seconds:.0f}s" for name, seconds in comparison.phase_seconds.items())
    return [
        Heading(f"Comparison: {comparison.scenario}", 1),
        Paragraph(
            f"Seed {comparison.seed}, data {comparison.data}, "
            f"{comparison.resolution}x{comparison.resolution}; "
            f"test images per task: {', '.join(f'{t} {n}' for t, n in comparison.test_images.items())} (the "
            f"same for every method). Cloud rounds: {comparison.cloud_trainer}. {quality_text}. "
            f"Seconds per phase: {phases}. The BAIM run's own report: {comparison.baim_run}/report.json."
        ),
        *_ttq_blocks(comparison),
        *_goal_blocks(comparison),
        *_conclusion_blocks(comparison),
        *_methods_blocks(comparison),
        *_plot_blocks(out_dir, comparison),
        *_curves_blocks(comparison),
        *_sample_blocks(out_dir, comparison),
    ]


# --------------------------------------------------------------------------------------------------------
# Rendering


def _md_cell(value: object) -> str:
    return str(value).replace("|", "\\|")


def render_markdown(blocks: Sequence[Block]) -> str:
    lines: list[str] = []
    for block in blocks:
        if isinstance(block, Heading):
            lines += ["#" * block.level + " " + block.text, ""]
        elif isinstance(block, Paragraph):
            lines += [block.text, ""]
        elif isinstance(block, Table):
            lines.append("| " + " | ".join(_md_cell(h) for h in block.header) + " |")
            lines.append("|" + "|".join("---" for _ in block.header) + "|")
            lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in block.rows]
            lines.append("")
        else:
            lines += [f"![{block.alt}]({block.path})", ""]
    return "\n".join(lines)


def data_uri(path: Path) -> str:
    """A PNG file as a data: URI (the HTML report carries its images inside)."""
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def render_html(blocks: Sequence[Block], out_dir: Path, title: str) -> str:
    body: list[str] = []
    for block in blocks:
        if isinstance(block, Heading):
            body.append(f"<h{block.level}>{html.escape(block.text)}</h{block.level}>")
        elif isinstance(block, Paragraph):
            body.append(f"<p>{html.escape(block.text)}</p>")
        elif isinstance(block, Table):
            head = "".join(f"<th>{html.escape(str(h))}</th>" for h in block.header)
            rows = "".join(
                "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>"
                for row in block.rows
            )
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        else:
            body.append(f'<p><img alt="{html.escape(block.alt)}" src="{data_uri(out_dir / block.path)}"></p>')
    style = (
        "body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;line-height:1.4}"
        "table{border-collapse:collapse;margin:1em 0;font-size:0.85em}"
        "td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}th{background:#f4f4f4}"
        "img{max-width:100%}"
    )
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )


def write_comparison_report(out_dir: str | Path, comparison: Comparison | None = None) -> tuple[Path, Path]:
    """Write DIR/report.md, DIR/report.html and DIR/plots/*.png from `comparison` (default: read
    DIR/comparison.json)."""
    out = Path(out_dir)
    if comparison is None:
        comparison = Comparison.model_validate_json((out / "comparison.json").read_text(encoding="utf-8"))
    blocks = comparison_blocks(out, comparison)
    markdown_path, html_path = out / "report.md", out / "report.html"
    markdown_path.write_text(render_markdown(blocks), encoding="utf-8")
    html_path.write_text(render_html(blocks, out, f"Comparison: {comparison.scenario}"), encoding="utf-8")
    return markdown_path, html_path
