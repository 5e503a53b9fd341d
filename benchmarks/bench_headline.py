"""The headline comparison, BAIM vs FedAvg, at the demo's scale: bytes and FLOPs per edge, cloud FLOPs, test
loss and FID side by side, and the ratios.

    .venv/bin/python benchmarks/bench_headline.py                      # runs scenarios/quickstart.yaml
    .venv/bin/python benchmarks/bench_headline.py --from demo-out      # reads a finished run's report.json
    .venv/bin/python benchmarks/bench_headline.py --scenario scenarios/tiny.yaml --fid-samples 32

Running a scenario goes through the engine exactly as `baim run` does (edges, async fusion, Ray Train,
decomposition), then the end-of-run evaluation (FedAvg on the same edge actors and shards, personalisation,
FID/KID with the offline Inception). Prints numbers; asserts nothing.

FedAvg's traffic per edge is the same every round (the global model down, an update up), so the bytes ratio
grows linearly with the number of rounds; the last lines print how many FedAvg rounds the measured
per-round cost needs to reach 47x (the paper's ratio with whole-model download) and 100x (the goal with
task-model download). That is arithmetic on measured sizes, labelled as such, not a measurement.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from orchestrator.core.reports import ImageQuality, RunReport  # noqa: E402
from orchestrator.report.markdown import fedavg_edge_rows, fedavg_of, headline, read_report  # noqa: E402


def run(scenario_path: Path, out_dir: Path, fid_samples: int) -> RunReport:
    from orchestrator.core.scenario import load_scenario
    from orchestrator.evaluation.evaluate import EvaluationOptions, evaluation_stage
    from orchestrator.runtime.engine import EngineOptions, run_scenario

    scenario = load_scenario(scenario_path)
    started = time.perf_counter()
    options = EngineOptions(
        progress=lambda line: print(f"  [{time.perf_counter() - started:7.1f}s] {line}", flush=True),
        after_run=evaluation_stage(EvaluationOptions(fid_samples=fid_samples)),
    )
    return run_scenario(scenario, out_dir, options)


def show(report: RunReport, source: str) -> None:
    numbers = headline(report)
    b, f, c = numbers["bytes_per_edge"], numbers["edge_flops_per_edge"], numbers["cloud_flops"]
    t, q = numbers["test_loss"], numbers["fid"]
    data = report.data

    def num(value: float | None, fmt: str = "{:,.0f}") -> str:
        return "n/a" if value is None else fmt.format(value)

    print(f"\nheadline from {source}")
    print(f"scenario {report.scenario.name}, seed {report.seed}, data {data.kind} ({data.root}), "
          f"{data.resolution} px")  # fmt: skip
    print(f"edges: {numbers['edges_baim']} BAIM (accepted uploads), {numbers['edges_fedavg']} FedAvg "
          f"clients; task models from strategy {numbers['kept_strategy']}")  # fmt: skip
    rows = [
        ("bytes/edge  BAIM upload only", num(b["baim_upload_only"]), ""),
        ("bytes/edge  BAIM upload + task model", num(b["baim_with_task_model"]), ""),
        ("bytes/edge  BAIM upload + whole BAIM", num(b["baim_with_whole_baim"]), ""),
        ("bytes/edge  FedAvg", num(b["fedavg"]), ""),
        ("ratio FedAvg / BAIM (task-model download)", num(b["ratio_fedavg_over_baim_task_model"], "{:.2f}x"),
         "goal >= 100x"),
        ("ratio FedAvg / BAIM (whole-BAIM download)", num(b["ratio_fedavg_over_baim_whole_baim"], "{:.2f}x"),
         "paper ~47x"),
        ("edge FLOPs/edge  BAIM training", num(f["baim_training"]), ""),
        ("edge FLOPs/edge  BAIM + personalisation", num(f["baim_training_plus_personalisation"]), ""),
        ("edge FLOPs/edge  FedAvg", num(f["fedavg"]), ""),
        ("ratio FedAvg / BAIM edge FLOPs (training)", num(f["ratio_fedavg_over_baim"], "{:.2f}x"), ""),
        ("cloud FLOPs  BAIM, all strategies", num(c["baim_all_strategies"]), ""),
        ("cloud FLOPs  BAIM, kept strategy", num(c["baim_kept_strategy"]), ""),
        ("cloud FLOPs  FedAvg (aggregation)", num(c["fedavg"]), "element-wise: 0 matmul/conv FLOPs"),
        ("test loss  BAIM task models", num(t["baim_task_models"], "{:.5f}"), ""),
        ("test loss  personalised edges", num(t["personalised"], "{:.5f}"), ""),
        ("test loss  FedAvg global", num(t["fedavg"], "{:.5f}"), ""),
        ("FID  BAIM task models", num(q["baim_task_models"], "{:.1f}"), ""),
        ("FID  edge initial models", num(q["edge_initial"], "{:.1f}"), ""),
        ("FID  personalised edges", num(q["personalised"], "{:.1f}"), ""),
        ("FID  FedAvg global", num(q["fedavg"], "{:.1f}"), ""),
    ]  # fmt: skip
    width = max(len(label) for label, _, _ in rows)
    for label, value, note in rows:
        print(f"  {label.ljust(width)}  {value:>16}  {note}")
    quality = report.image_quality
    if isinstance(quality, ImageQuality):
        print(f"FID/KID: {quality.extractor}, {quality.num_generated} generated vs "
              f"{quality.num_real} real images per set")  # fmt: skip
    fedavg = fedavg_of(report)
    rounds = len(fedavg.rounds) if fedavg is not None else 0
    clients = fedavg_edge_rows(report)
    if rounds and clients and b["baim_with_task_model"]:
        bytes_total = sum(row.bytes_sent + row.bytes_received for row in clients.values())
        per_round = bytes_total / len(clients) / rounds
        print(f"FedAvg bytes per edge per round (measured): {per_round:,.0f} over {rounds} rounds")
        for goal, baim_bytes, what in ((100, b["baim_with_task_model"], "task-model download"),
                                       (47, b["baim_with_whole_baim"], "whole-BAIM download")):  # fmt: skip
            if baim_bytes:
                needed = math.ceil(goal * baim_bytes / per_round)
                print(f"  arithmetic: FedAvg reaches {goal}x BAIM ({what}) after {needed} rounds")
    seconds = report.evaluation.seconds if report.evaluation is not None else {}
    phases = {k: round(v) for k, v in seconds.items()}
    wall = report.totals.wall_seconds
    print(f"wall seconds: BAIM run {wall:.0f}, evaluation {json.dumps(phases)}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--from", dest="from_dir", type=Path, default=None, help="a finished run's folder")
    parser.add_argument("--scenario", type=Path, default=REPO / "scenarios" / "quickstart.yaml")
    parser.add_argument("--fid-samples", type=int, default=100, help="images per FID/KID set")
    parser.add_argument("--out", type=Path, default=None, help="run folder (default: a temporary one)")
    args = parser.parse_args()
    if args.from_dir is not None:
        show(read_report(args.from_dir / "report.json"), str(args.from_dir / "report.json"))
        return
    with tempfile.TemporaryDirectory(prefix="bench-headline-") as temporary:
        out = args.out or Path(temporary)
        started = time.perf_counter()
        report = run(args.scenario, out, args.fid_samples)
        print(f"run + evaluation: {time.perf_counter() - started:.0f} s")
        show(report, f"a fresh run of {args.scenario}")


if __name__ == "__main__":
    main()
