"""Complete report.json documents with hand-chosen numbers, for the report and CLI tests.

`hand_report()` is valid (`RunReport.model_validate` accepts it): two edges of one task `smile`, numbers
chosen so that every headline ratio is easy to compute by hand (see tests/unit/test_report.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from orchestrator.core.reports import REPORT_FORMAT_VERSION
from orchestrator.core.scenario import Scenario

HAND_SCENARIO: dict[str, Any] = {
    "name": "hand",
    "seed": 3,
    "data": {"resolution": 8},
    "tasks": [{"name": "smile", "expression": "Smiling"}],
    "edges": [
        {"id": edge_id, "task": "smile", "shard_size": 10, "model": {"widths": [4], "latent_dim": 2}}
        for edge_id in ("e0", "e1")
    ],
}


def edge_row(bytes_sent: int, flops: int, *, status: str = "accepted") -> dict[str, Any]:
    accepted = status == "accepted"
    return {
        "task": "smile",
        "status": status,
        "error": None,
        "resources": {"CPU": 0.25},
        "shard_size": 10,
        "epochs_done": 1,
        "local_epochs": 1,
        "validation_loss": [],
        "best_epoch": None,
        "bytes_sent": bytes_sent,
        "bytes_received": 0,
        "flops": flops,
        "train_seconds": 1.0,
        "upload_seconds": 0.1,
        "upload": {
            "outcome": "accepted" if accepted else "none",
            "reason": "",
            "detail": "",
            "sha256": "ab" * 32 if accepted else None,
            "artifact": "edge/e0@v000001" if accepted else None,
            "receipt_from": "edge" if accepted else "none",
            "admission": "admitted" if accepted else None,
            "decision_seconds": 0.05 if accepted else None,
        },
        "costs_are_final": True,
    }


def local_result(test_loss: list[float]) -> dict[str, Any]:
    return {
        "train_loss": test_loss,
        "test_loss": test_loss,
        "flops": 1,
        "seconds": 1.0,
        "epochs": len(test_loss),
        "connections": [1] * len(test_loss),
        "runner": "local",
        "chosen_by": "cloud.trainer: local",
        "test_loss_per_task": [{"smile": loss} for loss in test_loss],
        "flops_per_epoch": [1] + [0] * (len(test_loss) - 1),
        "seconds_per_epoch": [1.0 / len(test_loss)] * len(test_loss),
    }


def ray_train_result(initial: float, test_loss: list[float]) -> dict[str, Any]:
    return {
        "runner": "ray_train",
        "epochs": len(test_loss),
        "train_loss": test_loss,
        "test_loss": test_loss,
        "test_loss_per_task": [{"smile": loss} for loss in test_loss],
        "initial_test_loss": initial,
        "final_test_loss": test_loss[-1],
        "flops": 1,
        "seconds": 1.0,
        "wall_seconds": 2.0,
        "num_workers": 1,
        "use_gpu": False,
        "resumed_at_epochs": [],
        "connections": [1] * len(test_loss),
        "checkpoint_uri": "/registry/ray_train/round-0001-finetune/epoch-0002",
        "fixed_seconds": 1.0,
        "chosen_by": "cloud.trainer: ray_train",
        "flops_per_epoch": [1] + [0] * (len(test_loss) - 1),
        "seconds_per_epoch": [1.0 / len(test_loss)] * len(test_loss),
    }


def quality_set(phase: str, name: str, fid: float, kid_mean: float) -> dict[str, Any]:
    return {
        "phase": phase,
        "name": name,
        "task": "smile",
        "fid": fid,
        "kid_mean": kid_mean,
        "kid_std": 0.001,
        "num_generated": 20,
        "num_real": 20,
        "kid_subset_size": 10,
    }


def fedavg_round(server_round: int, aggregated: list[str], test_loss: float) -> dict[str, Any]:
    failures = [{"edge": e, "reason": "crashed", "detail": ""} for e in ("e0", "e1") if e not in aggregated]
    return {
        "round": server_round,
        "available": ["e0", "e1"],
        "selected": ["e0", "e1"],
        "aggregated": aggregated,
        "failures": failures,
        "global_updated": True,
        "global_model_bytes": 10_000,
        "test_loss_per_task": {"smile": test_loss},
        "test_loss": test_loss,
        "seconds": 1.0,
        "bytes_sent": {e: 9_000 for e in aggregated},
        "bytes_received": {"e0": 10_000, "e1": 10_000},
        "flops": {e: 100 for e in aggregated},
        "aggregation_flops": 0,
    }


def fedavg_edge(bytes_sent: int, bytes_received: int, flops: int) -> dict[str, Any]:
    return {
        "task": "smile",
        "status": "ready",
        "shard_size": 10,
        "rounds_aggregated": [1],
        "failures": [],
        "bytes_sent": bytes_sent,
        "bytes_received": bytes_received,
        "flops": flops,
        "train_seconds": 1.0,
    }


def personalised_edge(test_loss_after: float, flops: int) -> dict[str, Any]:
    return {
        "task": "smile",
        "model_version": "v000001",
        "kind": "task_model",
        "download": "full",
        "params": 50,
        "bytes_received": 2_000,
        "epochs": 1,
        "method": "full",
        "trainable_params": 50,
        "upload_bytes": 200,
        "test_loss_before": 0.5,
        "test_loss_after": test_loss_after,
        "flops": flops,
        "seconds": 1.0,
    }


def empty_ledger() -> dict[str, Any]:
    return {
        "format_version": 2,
        "edges": {},
        "cloud_flops": {},
        "phases": {},
        "upload_counts": {"accepted": 0, "rejected": {}},
        "uploads": [],
        "events": [],
    }


def bare_report() -> dict[str, Any]:
    """A BAIM run without measurements, no edge and no cloud round (valid)."""
    return {
        "format_version": REPORT_FORMAT_VERSION,
        "run_id": "20260101T000000Z-abcdef",
        "failure": None,
        "scenario": Scenario.model_validate(HAND_SCENARIO).model_dump(mode="json"),
        "seed": 3,
        "data": {
            "kind": "celeba",
            "root": "/data",
            "num_images": 100,
            "test_split_drawn": True,
            "partition_counts": {"train": 100, "valid": 0, "test": 0},
            "resolution": 8,
            "shards": {"test": {"smile": 10}},
        },
        "edges": {},
        "uploads": [],
        "cloud": {
            "strategies": {},
            "flops": {},
            "seconds": {},
            "rounds": [],
            "round_errors": [],
            "baim_version": None,
            "baim_params": 0,
            "learners": [],
            "untrained_learners": [],
            "coordinator_restarts": 0,
            "new_tasks": [],
            "learner_pruning": None,
        },
        "tasks": {},
        "totals": {
            "edge_bytes_sent": 0,
            "edge_bytes_received": 0,
            "edge_flops": 0,
            "cloud_flops": 0,
            "uploads": {"accepted": 0, "rejected": {}},
            "wall_seconds": 12.0,
            "simulated_seconds": None,
        },
        "events": [],
        "registry": "/registry",
        "ledger": empty_ledger(),
    }


def hand_report() -> dict[str, Any]:
    """Two edges of one task with every section measured; the numbers are the hand computation's."""
    report = bare_report()
    report["edges"] = {"e0": edge_row(1_000, 100), "e1": edge_row(3_000, 300)}
    report["tasks"] = {
        "smile": {
            "params": 50,
            "baim_params": 90,
            "learners": ["e0", "e1"],
            "test_loss": 0.5,
            "test_images": 10,
            "decomposition_max_abs_diff": 0.0,
            "artifact": "task/smile@v000001",
            "sha256": "cd" * 32,
            "nbytes": 2_000,
            "squad_params": 40,
            "budget_params": 46,
            "generation": {
                "artifact": "generation/smile@v000001",
                "sha256": "ef" * 32,
                "params": 20,
                "nbytes": 800,
                "max_abs_diff": 0.0,
                "images_checked": 8,
            },
        }
    }
    report["cloud"].update(
        flops={"finetune": 7_000, "scratch": 5_000},
        seconds={"finetune": 1.0, "scratch": 2.0},
        rounds=[
            {
                "round": 1,
                "learners": ["e0", "e1"],
                "baim_version": "v000001",
                "seconds": 3.0,
                "strategies": {
                    "finetune": ray_train_result(0.9, [0.7, 0.5]),
                    "scratch": local_result([1.2, 0.8]),
                },
                "kept": "finetune",
                "holdout_loss": None,
                "continual": None,
            }
        ],
        baim_version="v000001",
        baim_params=90,
        learners=["e0", "e1"],
    )
    report["downloads"] = {
        "task_models": {"smile": {"artifact": "task/smile@v000001", "kind": "full", "nbytes": 2_000}},
        "generation_models": {
            "smile": {"artifact": "generation/smile@v000001", "kind": "generation", "nbytes": 800}
        },
        "baim": {"artifact": "baim@v000001", "kind": "baim", "nbytes": 6_000},
        "strategy_models": {"finetune": "baim@v000001"},
    }
    report["baselines"] = {
        "fedavg": {
            "enabled": True,
            "model": {"kind": "learner", "widths": [4], "latent_dim": 2, "resolution": 8, "in_channels": 3},
            "params": 40,
            "aggregation": "mean",
            "stop_reason": "round_cap",
            "rounds_planned": 2,
            "local_epochs": 1,
            "client_fraction": 1.0,
            "weighting": "shard size",
            "initial_test_loss_per_task": {"smile": 1.0},
            "initial_test_loss": 1.0,
            "rounds": [fedavg_round(1, ["e0", "e1"], 0.8), fedavg_round(2, ["e0"], 0.6)],
            "final_test_loss_per_task": {"smile": 0.6},
            "final_test_loss": 0.6,
            "edges": {"e0": fedavg_edge(20_000, 20_000, 1_000), "e1": fedavg_edge(10_000, 30_000, 500)},
            "cloud_flops": 0,
            "cloud_flops_note": "aggregation is element-wise",
            "totals": {
                "edge_bytes_sent": 30_000,
                "edge_bytes_received": 50_000,
                "edge_flops": 1_500,
                "seconds": 2.0,
            },
            "events": [],
            "ledger": empty_ledger(),
        }
    }
    report["personalisation"] = {
        "enabled": True,
        "where": "driver process",
        "edges": {"e0": personalised_edge(0.4, 50), "e1": personalised_edge(0.2, 150)},
    }
    report["relay"] = {
        "enabled": True,
        "where": "driver process",
        "method": "fold_own",
        "gate_epochs": 1,
        "distil_epochs": 0,
        "guarded": True,
        "accepted": True,
        "holdout_loss_before": {"smile": 0.31},
        "holdout_loss_after": {"smile": 0.27},
        "distillation_loss_before": None,
        "distillation_loss_after": None,
        "baim_version": "v000002",
        "task_versions": {"smile": "task/smile@v000002"},
        "tasks": {
            "smile": {
                "folded": ["e0"],
                "rejected": {"e1": "invalid: adapter state: non-finite values"},
                "upload_bytes": 400,
                "test_loss_before": 0.3,
                "test_loss_after": 0.25,
                "candidate_test_loss": 0.25,
            }
        },
    }
    report["placements"] = {
        "enabled": True,
        "cloud_gflops": 100.0,
        "edges": {
            "e0": {
                "task": "smile",
                "users": 10,
                "requests_per_second": 1.0,
                "images_per_request": 1,
                "chosen": "all_edge",
                "placements": [
                    {
                        "name": "all_cloud",
                        "cut": None,
                        "edge_flops": 0,
                        "cloud_flops": 1000,
                        "uplink_bytes": 20,
                        "downlink_bytes": 300,
                        "latency_s": 0.05,
                        "edge_utilisation": 0.0,
                    },
                    {
                        "name": "all_edge",
                        "cut": None,
                        "edge_flops": 1000,
                        "cloud_flops": 0,
                        "uplink_bytes": 0,
                        "downlink_bytes": 0,
                        "latency_s": 0.01,
                        "edge_utilisation": 0.001,
                    },
                ],
            }
        },
    }
    report["image_quality"] = {
        "enabled": True,
        "extractor": "inception-test",
        "feature_dim": 2048,
        "num_generated": 20,
        "num_real": {"smile": 20},
        "kid_subsets": 10,
        "real_reference": {"smile": {"fid_real_half_vs_half": 5.0, "num_per_half": 10}},
        "sets": [
            quality_set("strategy", "finetune", 30.0, 0.01),
            quality_set("fedavg", "global", 90.0, 0.05),
            quality_set("edge_initial", "e0", 60.0, 0.03),
        ],
        "generation_seed": 1234,
    }
    report["evaluation"] = {
        "seconds": {"fedavg": 3.0, "image_quality": 4.0},
        "fid_samples": 20,
        "grid_samples": 4,
        "personalise_epochs": 1,
        "generation_seed": 1234,
        "samples_dir": "samples",
    }
    return report


def failed_run_report() -> dict[str, Any]:
    """A run whose second cloud round failed three times: no task models were published."""
    report = bare_report()
    report["data"]["kind"] = "procedural"
    report["failure"] = "cloud round 2 failed (tried 3 times; learners e0, e1): RuntimeError: no GPU"
    error = {"round": 2, "attempts": 3, "learners": ["e0", "e1"], "error": "RuntimeError: no GPU | see\nlog"}
    report["cloud"]["round_errors"] = [error]
    return report


def write_report_json(out_dir: Path, report: dict[str, Any]) -> Path:
    """`report` as out_dir/report.json; returns out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.json").write_text(json.dumps(report), encoding="utf-8")
    return out_dir
