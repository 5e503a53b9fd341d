"""report.md's lifecycle section: continual rounds and forgetting, few-shot tasks, pruned learners."""

from __future__ import annotations

from collections.abc import Sequence

from orchestrator.core.reports import RunReport

NOT_MEASURED = "_not measured_"


def _fmt(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]


def continual_lines(report: RunReport) -> list[str]:
    rounds = [r for r in report.cloud.rounds if r.continual is not None]
    if not rounds:
        return ["Continual rounds: none (every learner arrived before the first round)."]
    rows = []
    for r in rounds:
        c = r.continual
        assert c is not None
        for task, before in c.test_loss_before.items():
            rows.append([
                r.round, c.mode, ", ".join(c.new_learners) or "-", len(c.frozen_learners),
                f"{c.trainable_parameters:,}", task, _fmt(before), _fmt(c.test_loss_after[task]),
                f"{c.forgetting[task]:+.4f}",
            ])  # fmt: skip
    header = ["round", "mode", "new learners", "frozen learners", "trained params", "task",
              "test loss before", "after", "forgetting"]  # fmt: skip
    return [
        f"Continual rounds (`cloud.continual: {report.scenario.cloud.continual}`); forgetting is the test "
        "loss after the round minus before it (above 0: the round made the task worse).",
        "",
        *_table(header, rows),
    ]


def new_task_lines(report: RunReport) -> list[str]:
    if not report.cloud.new_tasks:
        return ["New tasks: none."]
    rows = []
    for t in report.cloud.new_tasks:
        vae = t.cloud_only_vae
        ratio = "-" if t.test_loss is None else f"{t.test_loss / vae.test_loss:.3f}"
        rows.append([
            t.task, f"`{t.expression}`", t.shots, len(t.members), f"{t.gate_parameters:,}", t.steps,
            _fmt(t.test_loss_untrained_gate), _fmt(t.test_loss), f"{_fmt(vae.test_loss)} ({vae.params:,})",
            ratio, "yes" if t.other_tasks_unchanged else "NO", t.artifact,
        ])  # fmt: skip
    header = ["task", "expression", "shots", "learners", "gate params", "steps", "loss, untrained gate",
              "few-shot task model", "cloud-only VAE (params)", "few-shot / VAE", "other tasks unchanged",
              "artifact"]  # fmt: skip
    return [
        "New tasks: a new LSGate over the existing learners, trained alone on the k shots, against a VAE "
        "trained in the cloud on the same k images (test loss on the new task's test images).",
        "",
        *_table(header, rows),
    ]


def pruning_lines(report: RunReport) -> list[str]:
    pruning = report.cloud.learner_pruning
    if pruning is None:
        return ["Model-level pruning: off (`cloud.min_selection_rate` unset)."]
    lines = [
        f"Model-level pruning before decomposition: learners selected by their LSGates in less than "
        f"{pruning.threshold:g} of the {pruning.images} cloud images routed to them leave their squads; "
        f"BAIM {pruning.params_before:,} -> {pruning.params_after:,} parameters (baim@{pruning.from_version} "
        f"-> baim@{pruning.baim_version}).",
        "",
        "Selection rates: "
        + ", ".join(f"{name} {rate:.3f}" for name, rate in sorted(pruning.selection_rates.items())),
        "",
    ]
    if not pruning.removed:
        return [*lines, "No learner was below the threshold."]
    rows = [
        [r.learner, r.task, f"{r.selection_rate:.3f}", "cut feeder" if r.kept_as_feeder else "deleted"]
        for r in pruning.removed
    ]
    return lines + _table(["removed learner", "task", "selection rate", "its modules"], rows)


def lifecycle_section(report: RunReport) -> list[str]:
    """The section's lines (a run without any lifecycle step says so in three lines)."""
    return [*continual_lines(report), "", *new_task_lines(report), "", *pruning_lines(report)]
