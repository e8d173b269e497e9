"""Breaks loudly when vLLM moves the KV connector seams our connector relies on: the
scheduler/worker split, metadata both ways, handshake metadata, per-rank aggregation."""

import inspect

from vllm.distributed.kv_transfer.kv_connector.utils import KVOutputAggregator
from vllm.distributed.kv_transfer.kv_connector.v1 import base
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.engine.core import EngineCore

from cluster.kv.connector.metadata import RankReport
from cluster.kv.connector.vllm_connector import DisaggConnector


def test_every_hook_we_override_exists_in_the_base_class():
    ours = {name for name, value in vars(DisaggConnector).items() if callable(value) and not name.startswith("_")}
    assert ours <= set(dir(base.KVConnectorBase_V1)), ours - set(dir(base.KVConnectorBase_V1))


def test_handshake_metadata_reaches_the_scheduler_side():
    src = inspect.getsource(EngineCore.__init__)
    assert "get_kv_connector_handshake_metadata()" in src and "set_xfer_handshake_metadata_pp_aware" in src


def test_worker_metadata_is_aggregated_over_ranks_and_finished_counts_reports():
    src = inspect.getsource(KVOutputAggregator.aggregate)
    assert "kv_connector_worker_meta" in src and ".aggregate(" in src
    assert "self._expected_finished_count" in src and "remaining_count_dict" in src
    assert "self._failed_recving_pending & finished_recving" in src
    merged = RankReport(bytes_received=1).aggregate(RankReport(bytes_received=2, bytes_sent=3))
    assert (merged.bytes_received, merged.bytes_sent) == (3, 3)


def test_pending_push_work_keeps_an_idle_engine_stepping():
    assert "has_pending_push_work()" in inspect.getsource(Scheduler.has_requests)
    fields = inspect.signature(base.KVConnectorTransferResults).parameters
    assert {"finished_sending", "finished_recving", "failed_recving"} <= set(fields)
