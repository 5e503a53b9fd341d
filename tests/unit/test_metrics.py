"""Ledger arithmetic, snapshot round-trip, merging, argument checks, and the loopback metrics server."""

from __future__ import annotations

import json
import time
import urllib.request

import pytest

from orchestrator.core.metrics import (
    MAX_UPLOAD_RECORDS,
    METRICS_REGISTRY,
    Ledger,
    render_latest,
    start_metrics_server,
)


def sample(metric: str, /, **labels: str) -> float:
    """Current value of one Prometheus sample in this module's registry (0 when never touched)."""
    value = METRICS_REGISTRY.get_sample_value(metric, labels)
    return 0.0 if value is None else value


def filled_ledger(export_metrics: bool = False) -> Ledger:
    ledger = Ledger(export_metrics=export_metrics)
    ledger.record_bytes("edge-0", "sent", 1000)
    ledger.record_bytes("edge-0", "sent", 24)
    ledger.record_bytes("edge-0", "received", 7)
    ledger.record_bytes("edge-1", "sent", 500)
    ledger.record_edge_flops("edge-0", 3_000_000_000_000)
    ledger.record_edge_flops("edge-1", 5)
    ledger.record_cloud_flops("finetune", 10**15)
    ledger.record_cloud_flops("finetune", 1)
    ledger.record_cloud_flops("freeze", 2)
    ledger.record_seconds("edge_train", 1.5, edge="edge-0")
    ledger.record_seconds("edge_train", 0.25, edge="edge-0")
    ledger.record_seconds("edge_train", 2.0, edge="edge-1")
    ledger.record_fusion_seconds(0.125)
    ledger.record_seconds("train/finetune", 3.0)
    ledger.record_upload("edge-0", "accepted", version=1)
    ledger.record_upload("edge-1", "rejected", reason="sha_mismatch", detail="expected ab.., got cd..")
    ledger.record_event("join", edge="edge-2", resources="edge_small")
    return ledger


# -- arithmetic -----------------------------------------------------------------------------------------


def test_bytes_flops_and_seconds_add_exactly() -> None:
    # Prepare / Execute
    ledger = filled_ledger()

    # Assert: hand-summed
    assert ledger.edge_costs("edge-0") == {
        "bytes_sent": 1024,
        "bytes_received": 7,
        "flops": 3_000_000_000_000,
        "seconds": {"edge_train": 1.75},
    }
    assert ledger.edge_costs("edge-1") == {
        "bytes_sent": 500,
        "bytes_received": 0,
        "flops": 5,
        "seconds": {"edge_train": 2.0},
    }
    assert ledger.total_bytes("sent") == 1524
    assert ledger.total_bytes("received") == 7
    assert ledger.cloud_flops() == {"finetune": 10**15 + 1, "freeze": 2}
    assert ledger.phase_seconds("edge_train") == 3.75
    assert ledger.phase_seconds("fusion") == 0.125
    assert ledger.phase_seconds("train/finetune") == 3.0
    assert ledger.phase_seconds("never") == 0.0
    assert ledger.to_dict()["phases"]["edge_train"] == {"seconds": 3.75, "count": 3}
    assert ledger.upload_counts() == {"accepted": 1, "rejected": {"sha_mismatch": 1}}
    assert [event["kind"] for event in ledger.events] == ["join"]
    assert ledger.events[0]["edge"] == "edge-2"


def test_phase_context_manager_times_the_block_and_survives_errors() -> None:
    ledger = Ledger(export_metrics=False)

    with ledger.phase("sleep", edge="edge-0"):
        time.sleep(0.02)
    with pytest.raises(RuntimeError), ledger.phase("sleep"):
        raise RuntimeError("boom")

    totals = ledger.to_dict()["phases"]["sleep"]
    assert totals["count"] == 2
    assert totals["seconds"] >= 0.02
    assert ledger.edge_costs("edge-0")["seconds"]["sleep"] >= 0.02


def test_unknown_edge_costs_name_the_known_edges() -> None:
    ledger = filled_ledger()
    with pytest.raises(KeyError, match=r"edge-9.*edge-0"):
        ledger.edge_costs("edge-9")


# -- snapshot -------------------------------------------------------------------------------------------


def test_to_dict_is_json_and_round_trips() -> None:
    ledger = filled_ledger()

    text = json.dumps(ledger.to_dict())
    restored = Ledger.from_dict(json.loads(text), export_metrics=False)

    assert restored.to_dict() == ledger.to_dict()
    # The restored ledger keeps counting from where it was.
    restored.record_bytes("edge-0", "sent", 1)
    assert restored.edge_costs("edge-0")["bytes_sent"] == 1025


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d["edges"]["edge-0"].__setitem__("bytes_sent", -1), r"edges\.edge-0\.bytes_sent"),
        (lambda d: d["cloud_flops"].__setitem__("freeze", 1.5), r"cloud_flops\.freeze\n"),
        (lambda d: d["phases"]["fusion"].__setitem__("seconds", float("nan")), r"phases\.fusion\.seconds"),
        (lambda d: d["uploads"][0].__setitem__("outcome", "lost"), r"uploads\.0\.outcome"),
        (lambda d: d["uploads"][1].__setitem__("reason", "free text"), r"uploads\.1\n.*reason"),
        (lambda d: d["events"][0].pop("kind"), r"events\.0\n.*kind"),
        (lambda d: d.pop("events"), r"events\n  Field required"),
        (lambda d: d.__setitem__("surplus", 1), r"surplus\n  Extra inputs are not permitted"),
        (lambda d: d.__setitem__("format_version", 99), "format_version"),
    ],
)
def test_from_dict_names_the_malformed_entry(mutate, message: str) -> None:
    data = filled_ledger().to_dict()
    mutate(data)
    with pytest.raises(ValueError, match=message):
        Ledger.from_dict(data)


# -- merge ----------------------------------------------------------------------------------------------


def test_merge_adds_costs_and_interleaves_records_by_time() -> None:
    # Prepare: a coordinator ledger and an edge ledger recorded later
    cloud = Ledger(export_metrics=False)
    cloud.record_cloud_flops("finetune", 100)
    cloud.record_bytes("edge-0", "received", 40)
    cloud.record_seconds("fusion", 0.5)
    cloud.record_upload("edge-0", "accepted")
    edge = filled_ledger()
    edge_before = edge.to_dict()

    # Execute
    cloud.merge(edge)

    # Assert
    assert cloud.edge_costs("edge-0")["bytes_sent"] == 1024
    assert cloud.edge_costs("edge-0")["bytes_received"] == 47
    assert cloud.edge_costs("edge-0")["seconds"] == {"edge_train": 1.75}
    assert cloud.cloud_flops() == {"finetune": 10**15 + 101, "freeze": 2}
    assert cloud.to_dict()["phases"]["fusion"] == {"seconds": 0.625, "count": 2}
    assert cloud.upload_counts() == {"accepted": 2, "rejected": {"sha_mismatch": 1}}
    times = [upload["time"] for upload in cloud.uploads]
    assert times == sorted(times)
    # The merged-in ledger is unchanged.
    assert edge.to_dict() == edge_before


def test_upload_records_are_bounded_and_counts_stay_exact() -> None:
    # A stream of bad uploads must not grow the ledger (it is inside every coordinator checkpoint).
    ledger = Ledger(export_metrics=False)
    extra = 25
    for i in range(MAX_UPLOAD_RECORDS + extra):
        ledger.record_upload("edge-0", "rejected", reason="sha_mismatch", version=i + 1, detail="bad")
    ledger.record_upload("edge-0", "accepted", version=1)

    assert ledger.upload_counts() == {"accepted": 1, "rejected": {"sha_mismatch": MAX_UPLOAD_RECORDS + extra}}
    records = ledger.uploads
    assert len(records) == MAX_UPLOAD_RECORDS
    assert records[-1]["outcome"] == "accepted"
    assert records[0]["version"] == extra + 2  # the oldest records were dropped, the newest kept
    restored = Ledger.from_dict(json.loads(json.dumps(ledger.to_dict())), export_metrics=False)
    assert restored.upload_counts() == ledger.upload_counts()
    assert restored.uploads == records


def test_merge_adds_counts_and_keeps_the_newest_records() -> None:
    first, second = Ledger(export_metrics=False), Ledger(export_metrics=False)
    for i in range(MAX_UPLOAD_RECORDS):
        first.record_upload("edge-0", "rejected", reason="non_finite", version=i + 1)
    for i in range(10):
        second.record_upload("edge-1", "accepted", version=i + 1)

    first.merge(second)

    assert first.upload_counts() == {"accepted": 10, "rejected": {"non_finite": MAX_UPLOAD_RECORDS}}
    records = first.uploads
    assert len(records) == MAX_UPLOAD_RECORDS
    assert [r["edge"] for r in records[-10:]] == ["edge-1"] * 10


def test_a_format_1_ledger_is_read_with_counts_from_its_records() -> None:
    current = filled_ledger().to_dict()
    old = {key: value for key, value in current.items() if key != "upload_counts"}
    old["format_version"] = 1

    restored = Ledger.from_dict(old, export_metrics=False)

    assert restored.upload_counts() == current["upload_counts"]
    assert restored.uploads == current["uploads"]


def test_merge_rejects_itself_and_non_ledgers() -> None:
    ledger = Ledger(export_metrics=False)
    with pytest.raises(ValueError, match="itself"):
        ledger.merge(ledger)
    with pytest.raises(ValueError, match="dict"):
        ledger.merge({"edges": {}})  # type: ignore[arg-type]


# -- bad values -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("record", "message"),
    [
        (lambda ledger: ledger.record_bytes("edge-0", "sent", -1), "nbytes.*-1"),
        (lambda ledger: ledger.record_bytes("edge-0", "sent", 1.5), "nbytes.*1.5"),
        (lambda ledger: ledger.record_bytes("edge-0", "sent", True), "nbytes.*True"),
        (lambda ledger: ledger.record_bytes("edge-0", "uploaded", 1), "direction.*uploaded"),
        (lambda ledger: ledger.record_bytes("", "sent", 1), "edge"),
        (lambda ledger: ledger.record_edge_flops("edge-0", -5), "flops.*-5"),
        (lambda ledger: ledger.record_cloud_flops("", 5), "strategy"),
        (lambda ledger: ledger.record_seconds("train", -0.1), "seconds.*-0.1"),
        (lambda ledger: ledger.record_seconds("train", float("inf")), "seconds.*inf"),
        (lambda ledger: ledger.record_upload("edge-0", "lost"), "outcome.*lost"),
        (lambda ledger: ledger.record_upload("edge-0", "rejected"), "reason"),
        (lambda ledger: ledger.record_upload("edge-0", "rejected", reason="Bad SHA!"), "reason.*Bad SHA!"),
        (lambda ledger: ledger.record_upload("edge-0", "accepted", reason="ok"), "reason.*ok"),
        (lambda ledger: ledger.record_event("join", edge=object()), "field 'edge'"),
        (lambda ledger: ledger.record_event("join", time=1.0), "time"),
    ],
)
def test_bad_values_raise_value_error_naming_them(record, message: str) -> None:
    ledger = Ledger(export_metrics=False)
    with pytest.raises(ValueError, match=message):
        record(ledger)
    assert ledger.to_dict() == Ledger(export_metrics=False).to_dict()


# -- Prometheus -----------------------------------------------------------------------------------------


def test_recording_updates_prometheus_metrics() -> None:
    # Prepare: the registry is shared by the module, so compare before/after
    before = {
        "sent": sample("baim_bytes_total", edge="edge-p", direction="sent"),
        "cloud": sample("baim_flops_total", where="cloud", name="scratch"),
        "rejected": sample("baim_uploads_total", outcome="rejected", reason="non_finite"),
        "fusions": sample("baim_fusion_seconds_count"),
        "generations": sample("baim_generation_seconds_count", task="smiling"),
    }
    ledger = Ledger()

    # Execute
    ledger.record_bytes("edge-p", "sent", 300)
    ledger.record_cloud_flops("scratch", 7)
    ledger.record_upload("edge-p", "rejected", reason="non_finite")
    with ledger.fusion():
        pass
    with ledger.generation("smiling"):
        pass
    Ledger(export_metrics=False).record_bytes("edge-p", "sent", 10**6)  # not exported

    # Assert
    assert sample("baim_bytes_total", edge="edge-p", direction="sent") == before["sent"] + 300
    assert sample("baim_flops_total", where="cloud", name="scratch") == before["cloud"] + 7
    assert sample("baim_uploads_total", outcome="rejected", reason="non_finite") == before["rejected"] + 1
    assert sample("baim_fusion_seconds_count") == before["fusions"] + 1
    assert sample("baim_generation_seconds_count", task="smiling") == before["generations"] + 1


def test_merge_exports_the_merged_amounts_once() -> None:
    before = sample("baim_bytes_total", edge="edge-m", direction="received")
    edge = Ledger(export_metrics=False)
    edge.record_bytes("edge-m", "received", 11)
    cloud = Ledger()

    cloud.merge(edge)

    assert sample("baim_bytes_total", edge="edge-m", direction="received") == before + 11


def test_metrics_server_serves_every_metric_on_loopback() -> None:
    ledger = Ledger()
    ledger.record_bytes("edge-s", "sent", 1)
    server, port = start_metrics_server(port=0)
    try:
        assert server.server_address[0] == "127.0.0.1"
        assert port > 0
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            assert response.status == 200
            body = response.read().decode()
    finally:
        server.shutdown()
        server.server_close()

    for name in (
        "baim_uploads_total",
        "baim_bytes_total",
        "baim_flops_total",
        "baim_phase_seconds_total",
        "baim_fusion_seconds",
        "baim_generation_seconds",
    ):
        assert f"# TYPE {name.removesuffix('_total')}" in body, name
    assert 'baim_bytes_total{direction="sent",edge="edge-s"}' in body
    # The same text backs an HTTP /metrics route.
    assert b"baim_bytes_total" in render_latest()


def test_metrics_server_rejects_a_bad_port() -> None:
    with pytest.raises(ValueError, match=r"port.*70000"):
        start_metrics_server(port=70000)
