"""Sizing the edge-worker pool from the cluster's resources (no Ray needed)."""

from __future__ import annotations

from orchestrator.runtime.pool import demand_key, node_capacity, plan_pool_sizes

NODE_A = {"Alive": True, "Resources": {"CPU": 4.0, "memory": 8e9, "site": 2.0}}
NODE_B = {"Alive": True, "Resources": {"CPU": 2.0, "GPU": 1.0}}
DEAD = {"Alive": False, "Resources": {"CPU": 64.0, "GPU": 8.0}}
CPU = demand_key({"CPU": 0.5})
SITE = demand_key({"CPU": 1.0, "site": 1.0})
GPU = demand_key({"CPU": 1.0, "GPU": 1.0})


def test_capacity_counts_each_alive_node_by_its_scarcest_resource() -> None:
    assert node_capacity(dict(CPU), [NODE_A, NODE_B, DEAD]) == 12  # 8 + 4; the dead node counts nothing
    assert node_capacity(dict(SITE), [NODE_A, NODE_B]) == 2  # only node A has `site`, 2 units
    assert node_capacity(dict(GPU), [NODE_A, NODE_B, DEAD]) == 1
    assert node_capacity({"CPU": 1.0, "absent": 1.0}, [NODE_A, NODE_B]) == 0


def test_sub_pools_hold_at_most_one_worker_per_edge_and_what_nodes_host() -> None:
    sizes = plan_pool_sizes({CPU: 3, SITE: 10, GPU: 5}, [NODE_A, NODE_B])
    assert sizes == {CPU: 3, SITE: 2, GPU: 1}


def test_sub_pools_scale_down_together_to_the_free_cpus_keeping_one_each() -> None:
    # 12 CPU workers (6 CPUs) + 2 site workers (2 CPUs) want 8 CPUs; 6 - 2 reserved = 4 are free: factor 1/2.
    sizes = plan_pool_sizes({CPU: 100, SITE: 100}, [NODE_A, NODE_B], reserve_cpus=2.0)
    assert sizes == {CPU: 6, SITE: 1}
    assert plan_pool_sizes({CPU: 100, SITE: 1}, [NODE_A], reserve_cpus=4.0) == {CPU: 1, SITE: 1}


def test_max_workers_caps_the_total_and_an_unmet_request_gets_no_worker() -> None:
    sizes = plan_pool_sizes({CPU: 100, demand_key({"CPU": 1.0, "tpu": 1.0}): 3}, [NODE_A], max_workers=4)
    assert sizes == {CPU: 4, demand_key({"CPU": 1.0, "tpu": 1.0}): 0}
