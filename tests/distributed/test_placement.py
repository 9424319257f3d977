"""Resource requests sized from node shapes (pure arithmetic over Node lists; no Ray needed)."""

import pytest

from almdn_ray.distributed.placement import Node, PlacementError, Request, fits, plan_scoring, plan_workers


def nodes(head_cpus, *workers):
    head = [Node("h" * 16, "10.0.0.1", head_cpus, 0, is_head=True)]
    return head + [Node(f"{i:016d}", f"10.0.0.{i + 2}", c, g) for i, (c, g) in enumerate(workers)]


def test_workers_ask_for_what_one_node_has_not_a_share_of_the_cluster():
    # The shape: a head of 8 CPUs and two 8-CPU nodes; 2 workers used to ask for 12 CPUs each.
    request = plan_workers(nodes(8, (8, 0), (8, 0)), what="training workers", count=2, use_gpu=False)
    assert (request.count, request.cpus, request.gpus) == (2, 8.0, 0.0)
    # kuberay.yaml: a head with no CPUs and 4 GPU nodes of 8 CPUs.
    request = plan_workers(nodes(0, *[(8, 1)] * 4), what="training workers", count=4, use_gpu=True)
    assert request.bundle() == {"CPU": 8.0, "GPU": 1.0}
    # One 2-CPU machine, 2 workers: 1 CPU each.
    assert plan_workers([Node("a" * 16, "127.0.0.1", 2, 0, True)], what="w", count=2, use_gpu=False).cpus == 1.0
    # Two GPUs in one 8-CPU node: the node's CPUs are shared by its GPUs' workers.
    assert plan_workers(nodes(0, (8, 2)), what="w", count=2, use_gpu=True).cpus == 4.0


def test_a_request_that_fits_no_node_names_it_and_every_node():
    with pytest.raises(PlacementError) as error:
        plan_workers(nodes(0, *[(8, 1)] * 4), what="training workers", count=5, use_gpu=True)
    text = str(error.value)
    assert "training workers: 5 x {1 CPU, 1 GPU}" in text and "head 10.0.0.1" in text
    assert all(f"worker 10.0.0.{i}" in text for i in range(2, 6))
    with pytest.raises(PlacementError, match="cpus_per_worker"):
        plan_workers(nodes(0, (8, 0)), what="w", count=1, use_gpu=False, cpus_per_worker=16)
    with pytest.raises(PlacementError, match="GPU"):
        plan_workers(nodes(8, (8, 0)), what="EVAL", count=1, use_gpu=True)


def test_scoring_leaves_cpus_for_decoding_and_never_sizes_for_the_head():
    gpu = plan_scoring(nodes(8, *[(8, 1)] * 4), use_gpu=True, num_actors=None)
    assert (gpu.count, gpu.cpus, gpu.gpus) == (4, 1.0, 1.0)
    cpu = plan_scoring([Node("a" * 16, "127.0.0.1", 2, 0, True)], use_gpu=False, num_actors=None)
    assert (cpu.count, cpu.cpus) == (2, 0.5)  # two actors, one CPU left for Ray Data's tasks
    cpu = plan_scoring(nodes(8, (8, 0), (8, 0)), use_gpu=False, num_actors=None)
    assert cpu.count == 16 and cpu.cpus * cpu.count <= 14  # a CPU per worker node stays free
    assert fits(Request("x", 2, 4.0), nodes(0, (8, 0))) and not fits(Request("x", 3, 4.0), nodes(0, (8, 0)))
