"""CloudCoordinator as a plain class (no Ray): validation, idempotence, fusion, rounds, checkpoint/resume."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from actors.coordinator import STATE_KEY, CloudCoordinator, RegistryHeldByAnotherRun
from actors.edge import upload_spec
from actors.receipt_log import ReceiptLog
from actors.rounds import RoundFailed, RoundRequest, RoundResult
from actors.uploads import fresh_learner_rms, largest_rms_ratio, validation_slots
from baim.config import LearnerSpec
from baim.learners import VAELearner
from orchestrator.cloud.local import local_training_round
from orchestrator.core.artifacts import ArtifactPayload, compute_sha256, pack_state
from orchestrator.core.registry import Registry
from orchestrator.core.scenario import Scenario, UploadLimits
from tests.support.coordinator import learner_payload, make_coordinator, upload_kwargs
from tests.support.loop import LoopThread
from tests.support.scenarios import tiny_scenario


def test_valid_upload_is_stored_then_acknowledged_and_fused(tmp_path: Path, loop: LoopThread) -> None:
    # Prepare
    scenario = tiny_scenario(tmp_path, fusion={"min_new_models": 10, "max_wait_seconds": 1000})
    coordinator = make_coordinator(scenario, tmp_path / "registry")
    payload = learner_payload(scenario, "edge-0")

    # Execute
    receipt = loop.run(coordinator.upload(**upload_kwargs("edge-0", payload)))

    # Assert
    assert receipt["accepted"] is True and receipt["reason"] == ""
    assert receipt["artifact"] == "edge/edge-0@v000001"
    assert Registry(str(tmp_path / "registry")).get("edge/edge-0", "v000001") == payload
    status = loop.run(coordinator.status())
    assert status["learners"] == ["edge-0"] and status["pending"] == ["edge-0"]
    # The receipt log: received, then accepted (the state document holds no receipts).
    records = ReceiptLog(Registry(str(tmp_path / "registry"))).replay()
    assert [r.kind for r in records] == ["received", "decided"]
    assert records[0].key == receipt["key"]  # type: ignore[union-attr]
    assert records[1].receipt.model_dump() == receipt  # type: ignore[union-attr]
    assert "accepted" not in Registry(str(tmp_path / "registry")).get_json(STATE_KEY)


def test_resending_the_same_upload_returns_the_same_receipt(tmp_path: Path, loop: LoopThread) -> None:
    scenario = tiny_scenario(tmp_path, fusion={"min_new_models": 10, "max_wait_seconds": 1000})
    coordinator = make_coordinator(scenario, tmp_path / "registry")
    payload = learner_payload(scenario, "edge-0")

    first = loop.run(coordinator.upload(**upload_kwargs("edge-0", payload)))
    second = loop.run(coordinator.upload(**upload_kwargs("edge-0", payload)))

    assert first == second
    assert coordinator.ledger.upload_counts() == {"accepted": 1, "rejected": {}}
    assert loop.run(coordinator.status())["learners"] == ["edge-0"]


def _truncated(payload: ArtifactPayload) -> ArtifactPayload:
    weights = payload.weights[: len(payload.weights) // 2]
    return ArtifactPayload(weights, payload.spec_json, compute_sha256(payload.spec_json, weights))


def _float64(scenario: Scenario) -> ArtifactPayload:
    edge = scenario.edge("edge-0")
    spec = LearnerSpec(tuple(edge.model.widths), edge.model.latent_dim, scenario.data.resolution)
    state = {k: v.double() for k, v in VAELearner(spec).state_dict().items()}
    return pack_state(state, upload_spec(edge, spec))


def _wrong_task(scenario: Scenario) -> ArtifactPayload:
    edge = scenario.edge("edge-0")
    spec = LearnerSpec(tuple(edge.model.widths), edge.model.latent_dim, scenario.data.resolution)
    bad = upload_spec(edge.model_copy(update={"task": "female"}), spec)
    return pack_state(VAELearner(spec).state_dict(), bad)


def _bad_sha(payload: ArtifactPayload) -> ArtifactPayload:
    return ArtifactPayload(payload.weights, payload.spec_json, "0" * 64)


@pytest.mark.parametrize(
    ("make", "code", "detail_part"),
    [
        (lambda s: learner_payload(s, "edge-0", mode="nan"), "non_finite", "NaN or Inf"),
        (lambda s: learner_payload(s, "edge-0", mode="wrong_shapes"), "wrong_shapes", "expected shape"),
        (lambda s: learner_payload(s, "edge-0", mode="scale", scale=100.0), "implausible_loss", "below 10.0"),
        (lambda s: _bad_sha(learner_payload(s, "edge-0")), "sha256_mismatch", "declared"),
        (lambda s: _truncated(learner_payload(s, "edge-0")), "bad_weights", "truncated"),
        (_float64, "bad_dtype", "torch.float64"),
        (_wrong_task, "bad_spec", "spec task"),
    ],
    ids=["nan", "wrong_shapes", "scale", "sha256", "truncated", "float64", "wrong_task"],
)
def test_each_bad_upload_is_rejected_with_its_reason(
    tmp_path: Path, loop: LoopThread, make: Any, code: str, detail_part: str
) -> None:
    scenario = tiny_scenario(tmp_path, fusion={"min_new_models": 10, "max_wait_seconds": 1000})
    coordinator = make_coordinator(scenario, tmp_path / "registry")

    receipt = loop.run(coordinator.upload(**upload_kwargs("edge-0", make(scenario))))

    assert receipt["accepted"] is False
    assert receipt["reason"] == code, receipt["detail"]
    assert detail_part in receipt["detail"]
    assert Registry(str(tmp_path / "registry")).versions("edge/edge-0") == []
    # The coordinator keeps working: a good upload right after is accepted.
    good = loop.run(coordinator.upload(**upload_kwargs("edge-1", learner_payload(scenario, "edge-1"))))
    assert good["accepted"] is True


def test_oversized_unknown_edge_and_version_conflict_are_rejected(tmp_path: Path, loop: LoopThread) -> None:
    never = {"min_new_models": 10, "max_wait_seconds": 1000}
    scenario = tiny_scenario(tmp_path, fusion=never, uploads={"max_upload_bytes": 36_000})
    coordinator = make_coordinator(scenario, tmp_path / "registry")
    big = learner_payload(scenario, "edge-0")  # 41554 bytes
    small = learner_payload(scenario, "edge-1")  # 32351 bytes

    oversized = loop.run(coordinator.upload(**upload_kwargs("edge-0", big)))
    unknown = loop.run(coordinator.upload(**upload_kwargs("edge-99", small)))
    first = loop.run(coordinator.upload(**upload_kwargs("edge-1", small)))
    other = learner_payload(scenario, "edge-1", seed=1)
    conflict = loop.run(coordinator.upload(**upload_kwargs("edge-1", other)))

    assert big.nbytes > 36_000 > small.nbytes
    assert (oversized["accepted"], oversized["reason"]) == (False, "oversized")
    assert (unknown["accepted"], unknown["reason"]) == (False, "unknown_edge")
    assert first["accepted"] is True
    assert (conflict["accepted"], conflict["reason"]) == (False, "version_conflict")


class OverlapGauge:
    """Stands in for `UploadValidator.validate`: counts the validations running at once (they run in
    threads) and holds each one until `bound` have overlapped once, plus a moment, so that a coordinator
    without a bound would let more start meanwhile; then runs the real validation."""

    def __init__(self, validate: Any, bound: int) -> None:
        self.validate = validate
        self.bound = bound
        self.lock = threading.Lock()
        self.running = 0
        self.most = 0
        self.bound_reached = threading.Event()

    def __call__(self, *args: Any) -> Any:
        with self.lock:
            self.running += 1
            self.most = max(self.most, self.running)
            if self.running >= self.bound:
                self.bound_reached.set()
        try:
            self.bound_reached.wait(timeout=30)
            time.sleep(0.05)  # room for more validations to start, were nothing bounding them
            return self.validate(*args)
        finally:
            with self.lock:
                self.running -= 1


def test_concurrent_uploads_all_get_receipts_and_validations_are_bounded(
    tmp_path: Path, loop: LoopThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: at most 2 validations at once; 4 valid and 4 bad uploads (one of each per edge), sent at once.
    never = {"min_new_models": 10, "max_wait_seconds": 1000}
    scenario = tiny_scenario(tmp_path, fusion=never, uploads={"max_concurrent_validations": 2})
    coordinator = make_coordinator(scenario, tmp_path / "registry")
    gauge = OverlapGauge(coordinator.validator.validate, bound=2)
    monkeypatch.setattr(coordinator.validator, "validate", gauge)
    edges = ["edge-0", "edge-1", "edge-2", "edge-3"]
    good = {edge_id: learner_payload(scenario, edge_id) for edge_id in edges}
    uploads = [upload_kwargs(edge_id, good[edge_id], version=1) for edge_id in edges] + [
        upload_kwargs(edge_id, _bad_sha(good[edge_id]), version=2) for edge_id in edges
    ]

    async def send_all() -> list[dict[str, Any]]:
        return list(await asyncio.gather(*(coordinator.upload(**kwargs) for kwargs in uploads)))

    # Execute
    receipts = loop.run(send_all())

    # Assert: every upload got its own receipt, and the bound was reached but never exceeded.
    assert [(r["edge_id"], r["version"], r["accepted"], r["reason"]) for r in receipts] == [
        *[(edge_id, 1, True, "") for edge_id in edges],
        *[(edge_id, 2, False, "sha256_mismatch") for edge_id in edges],
    ]
    assert gauge.most == 2
    assert sorted(loop.run(coordinator.status())["learners"]) == edges


@pytest.mark.parametrize(("cpus", "slots"), [(1, 2), (2, 2), (8, 8), (64, 16)])
def test_validation_slots_default_to_the_usable_cpus_within_bounds(
    monkeypatch: pytest.MonkeyPatch, cpus: int, slots: int
) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda _: set(range(cpus)), raising=False)

    assert validation_slots(UploadLimits()) == slots
    assert validation_slots(UploadLimits(max_concurrent_validations=5)) == 5


def test_validation_slots_setting_rejects_zero() -> None:
    with pytest.raises(ValueError, match="max_concurrent_validations"):
        UploadLimits(max_concurrent_validations=0)


def test_restart_resumes_every_accepted_upload_from_the_registry(tmp_path: Path, loop: LoopThread) -> None:
    # Prepare: two accepted uploads, one rejected, and one stored by a coordinator that died before its
    # checkpoint (simulated by writing the artifact straight to the registry).
    scenario = tiny_scenario(tmp_path, fusion={"min_new_models": 10, "max_wait_seconds": 1000})
    registry_dir = tmp_path / "registry"
    # Payloads are built before any upload: fusion runs in a coordinator thread and draws from torch's global
    # RNG too, so seeding it here while a fusion runs would give a different payload now and then.
    payloads = {edge_id: learner_payload(scenario, edge_id) for edge_id in ("edge-0", "edge-2")}
    nan_payload = learner_payload(scenario, "edge-1", mode="nan")
    orphan = learner_payload(scenario, "edge-3")
    first = make_coordinator(scenario, registry_dir)
    receipts = [loop.run(first.upload(**upload_kwargs(edge_id, payloads[edge_id]))) for edge_id in payloads]
    poisoned = loop.run(first.upload(**upload_kwargs("edge-1", nan_payload)))
    Registry(str(registry_dir)).put("edge/edge-3", "v000001", orphan)

    # Execute
    second = make_coordinator(scenario, registry_dir)

    # Assert
    status = loop.run(second.status())
    assert status["restarts"] == 1
    assert status["accepted"] == ["edge-0", "edge-2", "edge-3"]
    assert status["learners"] == ["edge-0", "edge-2", "edge-3"]
    assert status["rejected"] == {"edge-1": "non_finite"}
    again = [loop.run(second.upload(**upload_kwargs(edge_id, payloads[edge_id]))) for edge_id in payloads]
    assert again == receipts
    assert loop.run(second.upload(**upload_kwargs("edge-3", orphan)))["accepted"] is True
    resent = loop.run(second.upload(**upload_kwargs("edge-1", nan_payload)))
    assert resent == poisoned
    # The fused learner holds exactly the uploaded weights.
    torch.manual_seed(0)
    expected = VAELearner(LearnerSpec((8, 16), 8, 16))
    for name, tensor in expected.state_dict().items():
        assert torch.equal(second.baim.learner("edge-0").state_dict()[name], tensor)  # type: ignore[union-attr]


def test_policy_round_trains_and_finish_publishes_exact_task_models(tmp_path: Path, loop: LoopThread) -> None:
    scenario = tiny_scenario(
        tmp_path, strategies=["finetune"], epochs=1, fusion={"min_new_models": 2, "max_wait_seconds": 1000}
    )
    coordinator = make_coordinator(scenario, tmp_path / "registry")
    for edge_id in ("edge-0", "edge-2"):
        loop.run(coordinator.upload(**upload_kwargs(edge_id, learner_payload(scenario, edge_id))))

    summary = loop.run(coordinator.finish(), timeout=300)

    assert [r["learners"] for r in summary["rounds"]] == [["edge-0", "edge-2"]]
    assert summary["untrained_learners"] == []
    assert summary["baim_version"] == "v000001"
    assert summary["ledger"]["cloud_flops"]["finetune"] > 0
    assert set(summary["tasks"]) == {"male", "female"}
    for task in summary["tasks"].values():
        assert task["decomposition_max_abs_diff"] <= 1e-5
        assert task["params"] < task["baim_params"]
        assert task["test_loss"] > 0
    registry = Registry(str(tmp_path / "registry"))
    assert registry.versions("task/male") == ["v000001"] and registry.versions("baim") == ["v000001"]


# ---- the plausibility gate's relative checks ----------------------------------------------------------


def test_loss_above_the_ratio_of_the_holdout_pixel_variance_is_rejected(
    tmp_path: Path, loop: LoopThread
) -> None:
    # Prepare: an untrained learner's loss is 1.2 to 2.2 x the holdout's pixel variance (measured); a ratio
    # limit of 1.0 ("beat the mean image") rejects it, the default 2.5 accepts it.
    never = {"min_new_models": 10, "max_wait_seconds": 1000}
    strict = make_coordinator(
        tiny_scenario(tmp_path, fusion=never, uploads={"max_loss_ratio": 1.0}), tmp_path / "a"
    )
    default = make_coordinator(tiny_scenario(tmp_path, fusion=never), tmp_path / "b")
    payload = learner_payload(strict.scenario, "edge-0")
    holdout = strict.validator.holdout_images("male")
    pixel_variance = float(((holdout - holdout.mean(dim=0, keepdim=True)) ** 2).mean())

    # Execute
    rejected = loop.run(strict.upload(**upload_kwargs("edge-0", payload)))
    accepted = loop.run(default.upload(**upload_kwargs("edge-0", payload)))

    # Assert
    assert (rejected["accepted"], rejected["reason"]) == (False, "implausible_loss"), rejected
    assert (
        f"at most 1.0 x {pixel_variance:.6g} (the loss of predicting the holdout's mean image)"
        in (rejected["detail"])
    )
    assert accepted["accepted"] is True, accepted


def test_inflated_weights_hidden_by_group_norm_are_rejected(tmp_path: Path, loop: LoopThread) -> None:
    """Scaling a convolution that a GroupNorm follows barely changes the loss; the norm check sees it."""
    # Prepare
    scenario = tiny_scenario(tmp_path, fusion={"min_new_models": 10, "max_wait_seconds": 1000})
    coordinator = make_coordinator(scenario, tmp_path / "registry")
    edge = scenario.edge("edge-0")
    spec = LearnerSpec(tuple(edge.model.widths), edge.model.latent_dim, scenario.data.resolution)
    torch.manual_seed(0)
    state = VAELearner(spec).state_dict()
    clean_loss = coordinator.validator.plausibility_loss(_loaded(spec, state), "male")
    state["encoder_stages.1.0.weight"] = state["encoder_stages.1.0.weight"] * 1000.0
    inflated_loss = coordinator.validator.plausibility_loss(_loaded(spec, state), "male")

    # Execute
    receipt = loop.run(
        coordinator.upload(**upload_kwargs("edge-0", pack_state(state, upload_spec(edge, spec))))
    )

    # Assert
    assert abs(inflated_loss - clean_loss) < 0.01 * clean_loss  # the loss checks cannot see it
    assert (receipt["accepted"], receipt["reason"]) == (False, "implausible_weights"), receipt
    assert receipt["detail"].startswith("tensor 'encoder_stages.1.0.weight': expected an RMS at most 50.0 x")


def _loaded(spec: LearnerSpec, state: dict[str, torch.Tensor]) -> VAELearner:
    learner = VAELearner(spec)
    learner.load_state_dict(state)
    return learner


def test_fresh_learner_rms_is_deterministic_and_leaves_the_global_rng_alone() -> None:
    spec = LearnerSpec((8, 16), 8, 16)
    torch.manual_seed(5)
    expected_draw = torch.rand(3)
    torch.manual_seed(5)

    first = fresh_learner_rms(spec)
    draw = torch.rand(3)

    assert torch.equal(draw, expected_draw)
    assert first == fresh_learner_rms(spec)
    assert first["encoder_stages.0.1.weight"] == 1.0  # GroupNorm weight starts at ones
    assert first["encoder_stages.0.1.bias"] == 0.0  # ... and its bias at zero: measured against "*"
    assert 0 < first["*"] < 1


def test_largest_rms_ratio_names_the_tensor_and_uses_the_whole_learner_for_zero_init_tensors() -> None:
    spec = LearnerSpec((8,), 4, 16)
    fresh = fresh_learner_rms(spec)
    learner = _loaded(spec, VAELearner(spec).state_dict())
    with torch.no_grad():
        learner.encoder_stages[0][1].bias.fill_(3.0 * fresh["*"])  # type: ignore[index]

    name, ratio = largest_rms_ratio(learner, fresh)

    assert name == "encoder_stages.0.1.bias"
    assert ratio == pytest.approx(3.0)


# ---- failed rounds and run ids ------------------------------------------------------------------------

NO_GPU = "use_gpu: the round needs 1 GPU(s) (one per worker) but the Ray cluster offers 0"


class FailingRunner:
    """A round runner that raises (like Ray Train's use_gpu check on a CPU-only cluster) for its first
    `failures` calls (None: always), then trains locally; counts its calls."""

    def __init__(self, failures: int | None = None) -> None:
        self.failures = failures
        self.calls = 0
        self.lock = threading.Lock()

    def __call__(self, request: RoundRequest) -> RoundResult:
        with self.lock:
            self.calls += 1
            calls = self.calls
        if self.failures is None or calls <= self.failures:
            raise RuntimeError(NO_GPU)
        return local_training_round(request)


def wait_until(check: Any, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_failed_round_is_recorded_backs_off_and_fails_finish(tmp_path: Path, loop: LoopThread) -> None:
    # Prepare: a round starts on every upload (min_new_models 1); its runner always fails.
    scenario = tiny_scenario(
        tmp_path, strategies=["finetune"], epochs=1, fusion={"min_new_models": 1, "max_wait_seconds": 1000}
    )
    runner = FailingRunner()
    coordinator = make_coordinator(scenario, tmp_path / "registry", round_runner=runner)
    payloads = {edge_id: learner_payload(scenario, edge_id) for edge_id in ("edge-0", "edge-2")}

    # Execute: one upload; its round fails; then several policy ticks (0.25 s each) pass.
    loop.run(coordinator.upload(**upload_kwargs("edge-0", payloads["edge-0"])))
    wait_until(lambda: coordinator.log.errors, "the first round's failure")
    time.sleep(1.5)

    # Assert: tried once (the old coordinator retried on every tick), the error is in the checkpoint.
    assert runner.calls == 1
    expected = {"round": 1, "attempts": 1, "learners": ["edge-0"], "error": f"RuntimeError: {NO_GPU}"}
    assert Registry(str(tmp_path / "registry")).get_json(STATE_KEY)["round_errors"] == [expected]
    assert loop.run(coordinator.status())["round_errors"] == [expected]

    # Execute: a new upload changes the pending set: the round is tried again at once (and fails again).
    loop.run(coordinator.upload(**upload_kwargs("edge-2", payloads["edge-2"])))
    wait_until(lambda: coordinator.log.errors[0].attempts == 2, "the second attempt's failure")

    # Assert: finish() does not retry the set that just failed, publishes nothing and names round and cause.
    with pytest.raises(RoundFailed, match=r"cloud round 1 failed \(tried 2 times; learners edge-0, edge-2\)"):
        loop.run(coordinator.finish())
    assert runner.calls == 2
    registry = Registry(str(tmp_path / "registry"))
    assert registry.versions("task/male") == [] and registry.versions("baim") == []
    summary = loop.run(coordinator.summary())
    assert summary["tasks"] == {} and summary["untrained_learners"] == ["edge-0", "edge-2"]
    assert summary["round_errors"][0]["error"] == f"RuntimeError: {NO_GPU}"


def test_round_failure_is_retried_after_max_wait_and_a_later_success_keeps_the_error_on_record(
    tmp_path: Path, loop: LoopThread
) -> None:
    # Prepare: the first attempt fails, the next one trains; the back-off lasts max_wait_seconds (0.5 s).
    scenario = tiny_scenario(
        tmp_path, strategies=["finetune"], epochs=1, fusion={"min_new_models": 1, "max_wait_seconds": 0.5}
    )
    runner = FailingRunner(failures=1)
    coordinator = make_coordinator(scenario, tmp_path / "registry", round_runner=runner)

    # Execute
    loop.run(coordinator.upload(**upload_kwargs("edge-0", learner_payload(scenario, "edge-0"))))
    wait_until(lambda: coordinator.log.rounds, "the retried round to finish")
    summary = loop.run(coordinator.finish(), timeout=300)

    # Assert
    assert runner.calls == 2
    assert [r["learners"] for r in summary["rounds"]] == [["edge-0"]]
    assert summary["round_errors"] == [
        {"round": 1, "attempts": 1, "learners": ["edge-0"], "error": f"RuntimeError: {NO_GPU}"}
    ]
    assert set(summary["tasks"]) == {"male"}


def test_after_a_failed_finish_neither_the_policy_timer_nor_summary_starts_rounds(
    tmp_path: Path, loop: LoopThread
) -> None:
    # Prepare: a back-off shorter than the wait below, a runner that always fails.
    scenario = tiny_scenario(
        tmp_path, strategies=["finetune"], epochs=1, fusion={"min_new_models": 1, "max_wait_seconds": 0.3}
    )
    runner = FailingRunner()
    coordinator = make_coordinator(scenario, tmp_path / "registry", round_runner=runner)
    loop.run(coordinator.upload(**upload_kwargs("edge-0", learner_payload(scenario, "edge-0"))))
    wait_until(lambda: coordinator.log.errors, "the first round's failure")
    with pytest.raises(RoundFailed):
        loop.run(coordinator.finish())
    calls = runner.calls

    # Execute: several back-off periods and policy ticks pass; the engine asks for the summary twice.
    time.sleep(1.5)
    first = loop.run(coordinator.summary())
    time.sleep(0.5)
    second = loop.run(coordinator.summary())

    # Assert: the report describes a coordinator that stopped training.
    assert runner.calls == calls
    assert first["round_errors"] == second["round_errors"]
    assert second["untrained_learners"] == ["edge-0"]


def test_restarted_coordinator_keeps_round_errors_and_tries_again(tmp_path: Path, loop: LoopThread) -> None:
    # Prepare: round 1 failed in the first coordinator (which then died).
    never = {"min_new_models": 10, "max_wait_seconds": 1000}
    scenario = tiny_scenario(tmp_path, strategies=["finetune"], epochs=1, fusion=never)
    first = make_coordinator(scenario, tmp_path / "registry", round_runner=FailingRunner())
    loop.run(first.upload(**upload_kwargs("edge-0", learner_payload(scenario, "edge-0"))))
    with pytest.raises(RoundFailed, match=r"cloud round 1 failed .*RuntimeError: use_gpu"):
        loop.run(first.finish())

    # Execute: Ray restarts it; this time the round trains.
    second = make_coordinator(scenario, tmp_path / "registry", round_runner=FailingRunner(0))
    summary = loop.run(second.finish(), timeout=300)

    # Assert
    assert summary["restarts"] == 1
    assert [e["round"] for e in summary["round_errors"]] == [1]
    assert [r["learners"] for r in summary["rounds"]] == [["edge-0"]]


def test_coordinator_refuses_the_state_of_another_run(tmp_path: Path, loop: LoopThread) -> None:
    # Prepare: run-a stored an upload.
    never = {"min_new_models": 10, "max_wait_seconds": 1000}
    scenario = tiny_scenario(tmp_path, fusion=never)
    registry_dir = tmp_path / "registry"
    first = make_coordinator(scenario, registry_dir, run_id="run-a")
    loop.run(first.upload(**upload_kwargs("edge-0", learner_payload(scenario, "edge-0"))))
    before = Registry(str(registry_dir)).get_json(STATE_KEY)

    # Execute / Assert: another run is refused and changes nothing; the same run resumes.
    with pytest.raises(
        RegistryHeldByAnotherRun, match="holds the coordinator state of run run-a, not of this run"
    ):
        make_coordinator(scenario, registry_dir, run_id="run-b")
    with pytest.raises(RegistryHeldByAnotherRun, match="run run-a, not of this run \\(no run id\\)"):
        make_coordinator(scenario, registry_dir)
    assert Registry(str(registry_dir)).get_json(STATE_KEY) == before
    again = make_coordinator(scenario, registry_dir, run_id="run-a")
    assert again.restarts == 1 and [r.edge_id for r in again.accepted] == ["edge-0"]


class KilledWhileResuming(BaseException):
    """Stands in for the actor's process dying in the middle of its __init__ (not an Exception: nothing
    may catch it)."""


def test_two_kills_in_quick_succession_count_two_restarts(
    tmp_path: Path, loop: LoopThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: one accepted upload; the coordinator is then killed.
    never = {"min_new_models": 10, "max_wait_seconds": 1000}
    scenario = tiny_scenario(tmp_path, fusion=never)
    registry_dir = tmp_path / "registry"
    first = make_coordinator(scenario, registry_dir)
    loop.run(first.upload(**upload_kwargs("edge-0", learner_payload(scenario, "edge-0"))))

    # Execute: the restarted coordinator is killed again while it re-fuses the upload (before its resume
    # finished), then restarted once more.
    with monkeypatch.context() as patch:

        def die(*_: Any) -> None:
            raise KilledWhileResuming

        patch.setattr(CloudCoordinator, "_fuse", die)
        with pytest.raises(KilledWhileResuming):
            make_coordinator(scenario, registry_dir)
    third = make_coordinator(scenario, registry_dir)

    # Assert: both restarts are counted, in the coordinator, its checkpoint and the summary.
    assert third.restarts == 2
    assert Registry(str(registry_dir)).get_json(STATE_KEY)["restarts"] == 2
    assert loop.run(third.summary())["restarts"] == 2
    assert loop.run(third.status())["learners"] == ["edge-0"]
