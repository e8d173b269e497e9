"""Multi-node: prefill and decode on different Ray nodes (ray.cluster_utils.Cluster on one
machine), each node advertising its pool's resource as `ray start --resources` would."""

from __future__ import annotations

import pytest
import ray
from ray.cluster_utils import Cluster

from cluster.client import Client, status_to_dict
from tests.integration.support import (
    ENGINE_ARGS,
    ServerProcess,
    corpus_token_ids,
    reference_greedy,
)


@pytest.fixture(scope="module")
def ray_cluster():
    ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    prefill_node = cluster.add_node(num_cpus=1, resources={"disagg_prefill": 1})
    decode_node = cluster.add_node(num_cpus=1, resources={"disagg_decode": 1})
    cluster.wait_for_nodes()
    yield cluster, prefill_node.node_id, decode_node.node_id
    ray.shutdown()
    cluster.shutdown()


def test_pools_land_on_their_nodes_and_outputs_match(ray_cluster, target_model, reference_llm, tokenizer):
    cluster, prefill_node, decode_node = ray_cluster
    server = ServerProcess(["--address", cluster.address, "--prefill", "1", "--decode", "1",
                            "--model", target_model, *ENGINE_ARGS])
    try:
        with Client(server.address, timeout=300) as client:
            nodes = {i["role"]: i["node_id"] for i in status_to_dict(client.cluster_status())["instances"]}
            assert nodes == {"prefill": prefill_node, "decode": decode_node}
            prompts = [corpus_token_ids(tokenizer, n, offset=7 * n) for n in (1, 128, 333)]
            expected = reference_greedy(reference_llm, prompts, [24, 24, 24])
            for prompt, want in zip(prompts, expected, strict=True):
                done = client.generate(prompt, max_tokens=24, temperature=0.0)
                assert done.token_ids == want and done.served_by == ["prefill-0", "decode-0"]
    finally:
        assert server.stop() == 0
