"""The coordinator with cloud.max_learners_per_task: which uploads the BAIM holds, what each receipt says."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from actors.edge import upload_spec
from baim.config import LearnerSpec
from baim.learners import VAELearner
from orchestrator.core.artifacts import ArtifactPayload, pack_state
from orchestrator.core.scenario import Scenario
from tests.support.coordinator import make_coordinator, upload_kwargs
from tests.support.loop import LoopThread
from tests.support.scenarios import tiny_scenario

NEVER = {"min_new_models": 100, "max_wait_seconds": 100_000}


def one_task_scenario(tmp_path: Path, edges: int, **cloud: Any) -> Scenario:
    """tiny.yaml with `edges` same-architecture edges on task male (and one on female, which none uploads)."""
    document = tiny_scenario(tmp_path, **cloud).model_dump(mode="json")
    template, female = document["edges"][0], document["edges"][2]
    male = [{**template, "id": f"edge-{i}", "task": "male"} for i in range(edges)]
    document["edges"] = [*male, {**female, "id": "f-0"}]
    return Scenario.model_validate(document)


def fresh_payload(scenario: Scenario, edge_id: str, seed: int) -> ArtifactPayload:
    edge = scenario.edge(edge_id)
    spec = LearnerSpec(tuple(edge.model.widths), edge.model.latent_dim, scenario.data.resolution)
    torch.manual_seed(seed)
    return pack_state(VAELearner(spec).state_dict(), upload_spec(edge, spec))


def test_six_uploads_to_a_task_bounded_at_three_leave_the_best_three(
    tmp_path: Path, loop: LoopThread
) -> None:
    # Prepare: six edges of one task, each a differently seeded learner (so their holdout losses differ).
    scenario = one_task_scenario(tmp_path, 6, fusion=NEVER, max_learners_per_task=3)
    coordinator = make_coordinator(scenario, tmp_path / "registry")
    edges = [f"edge-{i}" for i in range(6)]
    payloads = {edge_id: fresh_payload(scenario, edge_id, seed) for seed, edge_id in enumerate(edges)}

    # Execute: one after the other, so the replacements happen in a known order.
    acks = [loop.run(coordinator.upload(**upload_kwargs(e, payloads[e]))) for e in edges]
    summary = loop.run(coordinator.summary())

    # Assert: every upload accepted with its measured loss; the BAIM holds exactly the best three.
    losses = {ack["edge_id"]: ack["holdout_loss"] for ack in acks}
    assert all(ack["accepted"] for ack in acks) and len(set(losses.values())) == 6
    best = sorted(edges, key=lambda e: losses[e])[:3]
    assert sorted(summary["learners"]) == sorted(best)
    final = {r["edge_id"]: r for r in summary["accepted"]}
    assert sorted(final) == edges  # every upload has its receipt
    assert {e: final[e]["admission"] for e in edges} == {
        e: "admitted" if e in best else "registry_only" for e in edges
    }
    # An upload admitted at once but displaced later says by whom; one never admitted says why not.
    for edge_id in edges:
        ack, receipt = acks[edges.index(edge_id)], final[edge_id]
        if edge_id in best:
            assert receipt["admission_detail"] == ack["admission_detail"]
        elif ack["admission"] == "admitted":
            assert receipt["admission_detail"].startswith("displaced by ")
        else:
            assert "max_learners_per_task=3" in receipt["admission_detail"]
    # Each admission while full replaced the worst admitted learner at that moment.
    seated: list[str] = []
    for edge_id in edges:
        ack = acks[edges.index(edge_id)]
        if ack["admission"] == "admitted" and len(seated) == 3:
            worst = max(seated, key=lambda e: losses[e])
            assert ack["admission_detail"].startswith(f"replaced {worst} ")
            seated.remove(worst)
        if ack["admission"] == "admitted":
            seated.append(edge_id)
    assert sorted(seated) == sorted(best)
    displaced = [e for e in edges if acks[edges.index(e)]["admission"] == "admitted" and e not in best]
    assert displaced, "these seeds must exercise a replacement"

    # A restarted coordinator resumes the same BAIM and the same receipts.
    resumed = make_coordinator(scenario, tmp_path / "registry")
    again = loop.run(resumed.summary())
    assert sorted(again["learners"]) == sorted(best)
    assert again["accepted"] == summary["accepted"]


def test_without_the_bound_every_upload_is_admitted_and_a_second_version_is_registry_only(
    tmp_path: Path, loop: LoopThread
) -> None:
    scenario = one_task_scenario(tmp_path, 4, fusion=NEVER)
    coordinator = make_coordinator(scenario, tmp_path / "registry")

    acks = [
        loop.run(coordinator.upload(**upload_kwargs(f"edge-{i}", fresh_payload(scenario, f"edge-{i}", i))))
        for i in range(4)
    ]
    second = loop.run(coordinator.upload(**upload_kwargs("edge-0", fresh_payload(scenario, "edge-0", 9), 2)))

    assert [ack["admission"] for ack in acks] == ["admitted"] * 4
    assert second["accepted"] is True and second["admission"] == "registry_only"
    assert "learner edge-0 is in the BAIM already" in second["admission_detail"]
    assert loop.run(coordinator.status())["learners"] == [f"edge-{i}" for i in range(4)]


def test_learners_a_round_trained_keep_their_seats(tmp_path: Path, loop: LoopThread) -> None:
    # Prepare: a bound of 2, and a round as soon as two learners are pending.
    scenario = one_task_scenario(
        tmp_path, 3, fusion={"min_new_models": 2, "max_wait_seconds": 100_000}, max_learners_per_task=2
    )
    coordinator = make_coordinator(scenario, tmp_path / "registry")
    for i in range(2):
        loop.run(coordinator.upload(**upload_kwargs(f"edge-{i}", fresh_payload(scenario, f"edge-{i}", i))))
    deadline = time.monotonic() + 120
    while loop.run(coordinator.status())["rounds"] < 1:
        assert time.monotonic() < deadline, "the round did not finish"
        time.sleep(0.1)

    # Execute: a third upload, whatever its loss, finds both seats trained.
    late = loop.run(coordinator.upload(**upload_kwargs("edge-2", fresh_payload(scenario, "edge-2", 2))))

    # Assert
    assert late["accepted"] is True and late["admission"] == "registry_only"
    assert "all trained by a cloud round" in late["admission_detail"]
    assert loop.run(coordinator.status())["learners"] == ["edge-0", "edge-1"]


def test_a_displaced_edges_better_new_version_takes_the_seat_back(tmp_path: Path, loop: LoopThread) -> None:
    # Prepare: three learners ranked by the coordinator's own holdout loss (worst, middle, best), all drawn
    # before any upload (fusion threads draw from torch's global generator too).
    scenario = one_task_scenario(tmp_path, 2, fusion=NEVER, max_learners_per_task=1)
    coordinator = make_coordinator(scenario, tmp_path / "registry")
    edge = scenario.edge("edge-0")
    spec = LearnerSpec(tuple(edge.model.widths), edge.model.latent_dim, scenario.data.resolution)
    states = []
    for seed in range(3):
        torch.manual_seed(seed)
        states.append(VAELearner(spec).state_dict())
    losses = [coordinator.validator.plausibility_loss(_loaded(spec, state), "male") for state in states]
    worst, middle, best = sorted(range(3), key=lambda i: losses[i], reverse=True)
    assert len(set(losses)) == 3

    def payload(edge_id: str, index: int) -> ArtifactPayload:
        return pack_state(states[index], upload_spec(scenario.edge(edge_id), spec))

    # Execute: edge-0 (worst), edge-1 (middle) displaces it, edge-0's second version (best) displaces edge-1.
    acks = [
        loop.run(coordinator.upload(**upload_kwargs("edge-0", payload("edge-0", worst)))),
        loop.run(coordinator.upload(**upload_kwargs("edge-1", payload("edge-1", middle)))),
        loop.run(coordinator.upload(**upload_kwargs("edge-0", payload("edge-0", best), version=2))),
    ]
    summary = loop.run(coordinator.summary())

    # Assert: the BAIM holds edge-0 with its second version's weights.
    assert [ack["holdout_loss"] for ack in acks] == [losses[worst], losses[middle], losses[best]]
    details = [ack["admission_detail"].split(" (")[0] for ack in acks]
    assert details == ["", "replaced edge-0", "replaced edge-1"]
    assert summary["learners"] == ["edge-0"]
    assert [r["admission"] for r in summary["accepted"]] == ["registry_only", "registry_only", "admitted"]
    assert coordinator.baim is not None
    fused = coordinator.baim.learner("edge-0").state_dict()
    assert all(torch.equal(fused[name], states[best][name]) for name in states[best])


def _loaded(spec: LearnerSpec, state: dict[str, torch.Tensor]) -> VAELearner:
    learner = VAELearner(spec)
    learner.load_state_dict(state)
    return learner
