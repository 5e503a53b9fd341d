"""The Ray Train job's resource check: what the cluster can ever give the workers (pure, no Ray)."""

from __future__ import annotations

import pytest

from orchestrator.cloud.resources import (
    WORKER_GROUP_START_RETRIES,
    autoscaler_request,
    check_resources_fit,
    failure_config,
    wait_for_resources,
)

COORDINATOR = {"CPU": 0.5}  # EngineOptions.coordinator_num_cpus: held for the whole run


def test_workers_fitting_beside_the_launching_actor_pass() -> None:
    check_resources_fit(2, False, 1.0, {"CPU": 4.0}, COORDINATOR)
    check_resources_fit(1, False, 3.5, {"CPU": 4.0}, COORDINATOR)
    check_resources_fit(2, False, 2.0, {"CPU": 4.0}, {})  # a driver holds nothing


def test_cpus_held_by_the_launching_actor_are_not_available_to_the_workers() -> None:
    # paper_celeba: 2 workers x 2 CPUs on a 4-CPU cluster; only 3.5 CPUs are ever free.
    with pytest.raises(ValueError, match=r"2 workers x 2 CPUs = 4 CPUs.*has 4.*0\.5 stay held"):
        check_resources_fit(2, False, 2.0, {"CPU": 4.0}, COORDINATOR)
    # the default scenario with `baim run --num-cpus 1`: 1 worker x 1 CPU, 0.5 left.
    with pytest.raises(ValueError, match=r"cpus_per_worker: 1 workers x 1 CPUs = 1 CPUs"):
        check_resources_fit(1, False, 1.0, {"CPU": 1.0}, COORDINATOR)


def test_gpus_held_by_the_launching_actor_are_not_available_to_the_workers() -> None:
    check_resources_fit(2, True, 1.0, {"CPU": 8.0, "GPU": 2.0}, {"CPU": 0.5})
    with pytest.raises(ValueError, match=r"use_gpu: the round needs 2 GPU\(s\).*offers 2.*1 stay held"):
        check_resources_fit(2, True, 1.0, {"CPU": 8.0, "GPU": 2.0}, {"CPU": 0.5, "GPU": 1.0})
    with pytest.raises(ValueError, match=r"use_gpu: the round needs 1 GPU\(s\).*offers 0"):
        check_resources_fit(1, True, 1.0, {"CPU": 8.0}, {})


def test_bad_scaling_settings_are_named() -> None:
    with pytest.raises(ValueError, match="num_workers: expected >= 1"):
        check_resources_fit(0, False, 1.0, {"CPU": 4.0}, {})
    with pytest.raises(ValueError, match="cpus_per_worker: expected > 0"):
        check_resources_fit(1, False, 0.0, {"CPU": 4.0}, {})


def test_worker_group_start_retries_are_bounded() -> None:
    # Ray Train's default (-1) retries forever: a job that cannot be placed would hang until finish_timeout_s.
    config = failure_config(max_failures=1)
    assert config.max_failures == 1
    assert config.controller_failure_limit == WORKER_GROUP_START_RETRIES
    assert 0 <= WORKER_GROUP_START_RETRIES < 30


class FakeClock:
    """time.monotonic / time.sleep stand-ins: sleeping advances the clock, nothing waits."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def gpu_node_joins_at(clock: FakeClock, seconds: float):
    """The cluster's resources as an autoscaler brings a GPU node up `seconds` after the request."""
    return lambda: {"CPU": 8.0, "GPU": 1.0} if clock.now >= seconds else {"CPU": 4.0}


def needs_one_gpu(total: dict[str, float]) -> None:
    check_resources_fit(1, True, 1.0, total, COORDINATOR)


def test_waiting_returns_once_the_autoscaler_adds_the_node() -> None:
    clock = FakeClock()
    wait_for_resources(needs_one_gpu, gpu_node_joins_at(clock, 12.0), 900, clock=clock, sleep=clock.sleep)
    assert 12.0 <= clock.now < 12.0 + 5.0  # polled every 5 s


def test_waiting_fails_after_wait_s_naming_the_setting() -> None:
    clock = FakeClock()
    with pytest.raises(
        ValueError, match=r"use_gpu: the round needs 1 GPU.*waited 60s.*cloud\.wait_for_nodes_s"
    ):
        wait_for_resources(needs_one_gpu, gpu_node_joins_at(clock, 600.0), 60, clock=clock, sleep=clock.sleep)
    assert clock.now == 60.0  # the last poll lands on the deadline, not past it


def test_the_autoscaler_is_asked_for_the_workers_and_what_the_launcher_holds() -> None:
    # The autoscaler sizes for the whole request, ignoring usage: 2 x 2 CPUs alone "fit" a 4-CPU cluster
    # although the coordinator's 0.5 CPU is never free there.
    assert autoscaler_request(2, False, 2.0, COORDINATOR) == [{"CPU": 0.5}, {"CPU": 2.0}, {"CPU": 2.0}]
    assert autoscaler_request(1, True, 1.0, {"CPU": 0.5, "memory": 1e9}) == [
        {"CPU": 0.5},
        {"CPU": 1.0, "GPU": 1.0},
    ]
    assert autoscaler_request(2, True, 4.0, {}) == [{"CPU": 4.0, "GPU": 1.0}] * 2  # a driver holds nothing
