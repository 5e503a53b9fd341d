"""Whether the Ray cluster can ever host a round's Train workers, asked before any worker is requested.

A job the cluster can never host (fewer GPUs than workers with `use_gpu`, fewer CPUs than workers x
cpus_per_worker once the launching actor's own reservation is taken off) fails at once with an error naming
the setting; Ray Train would otherwise wait for the resources, time out and retry.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)


def check_resources_fit(
    num_workers: int,
    use_gpu: bool,
    cpus_per_worker: float,
    cluster_total: dict[str, float],
    held_by_caller: dict[str, float],
) -> None:
    """Raise ValueError, naming the setting, when `num_workers` Train workers can never be placed.

    What the job can ever get is the cluster's total minus what the calling process itself holds
    (`held_by_caller`): the actor that launches the job (the coordinator) keeps its own reservation for the
    whole run, so those resources are never free for the workers. Resources held by other actors are not
    subtracted: they are released eventually (finished edges are killed), so they only delay the start.
    """
    if num_workers < 1:
        raise ValueError(f"num_workers: expected >= 1, received {num_workers}")
    if cpus_per_worker <= 0:
        raise ValueError(f"cpus_per_worker: expected > 0, received {cpus_per_worker}")
    gpus_total, gpus_held = cluster_total.get("GPU", 0.0), held_by_caller.get("GPU", 0.0)
    if use_gpu and gpus_total - gpus_held < num_workers:
        raise ValueError(
            f"use_gpu: the round needs {num_workers} GPU(s) (one per worker) but the Ray cluster offers "
            f"{gpus_total:g}{_held_note(gpus_held)}; set cloud.use_gpu: false or add GPU nodes"
        )
    cpus_total, cpus_held = cluster_total.get("CPU", 0.0), held_by_caller.get("CPU", 0.0)
    needed = num_workers * cpus_per_worker
    if cpus_total - cpus_held < needed:
        raise ValueError(
            f"cpus_per_worker: {num_workers} workers x {cpus_per_worker:g} CPUs = {needed:g} CPUs, the Ray "
            f"cluster has {cpus_total:g}{_held_note(cpus_held)}; lower cloud.num_workers or "
            f"cloud.cpus_per_worker, or give Ray more CPUs"
        )


def _held_note(held: float) -> str:
    return f", of which {held:g} stay held by the process launching the job" if held > 0 else ""


def check_cluster_resources(
    num_workers: int, use_gpu: bool, cpus_per_worker: float, *, wait_for_nodes_s: float = 0.0
) -> None:
    """Fail, naming the setting, when the Ray cluster cannot host the workers: at once, or (wait_for_nodes_s
    > 0) after asking the autoscaler for the workers' resources and waiting that long for nodes to join.

    Called from the process that launches the job: when that is a Ray actor or task (the coordinator), its
    own reservation is subtracted (see `check_resources_fit`); a driver holds nothing.
    """
    import ray

    if not ray.is_initialized():
        raise RuntimeError("Ray is not initialised: call ray.init(...) (or run through the driver) first")
    context = ray.get_runtime_context()
    # get_assigned_resources() only works in a worker process (an actor or task), not in a driver.
    held = context.get_assigned_resources() if context.worker.mode == ray.WORKER_MODE else {}

    def check(total: dict[str, float]) -> None:
        check_resources_fit(num_workers, use_gpu, cpus_per_worker, total, held)

    try:
        check(ray.cluster_resources())
        return
    except ValueError:
        if wait_for_nodes_s <= 0:
            raise
    from ray.autoscaler.sdk import request_resources

    bundles = autoscaler_request(num_workers, use_gpu, cpus_per_worker, held)
    logger.info("asking the autoscaler for %s; waiting up to %gs", bundles, wait_for_nodes_s)
    request_resources(bundles=bundles)
    try:
        wait_for_resources(check, ray.cluster_resources, wait_for_nodes_s)
    finally:
        # The request is sticky; once the nodes are up, the job's own placement group keeps them in demand.
        request_resources(bundles=[])


def autoscaler_request(
    num_workers: int, use_gpu: bool, cpus_per_worker: float, held_by_caller: dict[str, float]
) -> list[dict[str, float]]:
    """The bundles to ask the autoscaler for: the workers', plus what the launching process holds.

    Why the latter: the autoscaler sizes the cluster for the request as a whole, ignoring what is in use, so
    without it a cluster of exactly the workers' size looks big enough although the coordinator's share of
    it is never free.
    """
    worker = {"CPU": cpus_per_worker, **({"GPU": 1.0} if use_gpu else {})}
    held = {key: value for key, value in held_by_caller.items() if key in ("CPU", "GPU") and value > 0}
    return ([held] if held else []) + [dict(worker) for _ in range(num_workers)]


def wait_for_resources(
    check: Callable[[dict[str, float]], None],
    cluster_resources: Callable[[], dict[str, float]],
    wait_s: float,
    *,
    poll_s: float = 5.0,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """Poll `cluster_resources()` until `check` accepts it (returns) or `wait_s` passed (raises `check`'s
    last ValueError, saying how long it waited)."""
    deadline = clock() + wait_s
    while True:
        try:
            check(cluster_resources())
            return
        except ValueError as err:
            if clock() >= deadline:
                raise ValueError(
                    f"{err} (waited {wait_s:g}s for the autoscaler to add nodes: cloud.wait_for_nodes_s)"
                ) from err
        sleep(min(poll_s, max(0.0, deadline - clock())))


# Ray Train v2 retries a worker group that cannot be placed forever by default (controller_failure_limit=-1),
# each attempt waiting RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S (60 s by default). `check_cluster_resources`
# rules out clusters that can never host the job; this bound turns the rest (resources held elsewhere for
# much longer than expected, a node lost) into an error after about that many minutes instead of a hang.
WORKER_GROUP_START_RETRIES = 5


def failure_config(max_failures: int) -> Any:
    """Ray Train's FailureConfig: `max_failures` worker failures, a bounded number of worker group starts."""
    import ray.train

    # ray.train.FailureConfig is Train v2's (the default in Ray 2.60) at run time; mypy sees the v1 class,
    # which lacks controller_failure_limit.
    return ray.train.FailureConfig(  # type: ignore[call-arg]
        max_failures=max_failures, controller_failure_limit=WORKER_GROUP_START_RETRIES
    )
