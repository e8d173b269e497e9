from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FinishReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FINISH_REASON_UNSPECIFIED: _ClassVar[FinishReason]
    FINISH_REASON_LENGTH: _ClassVar[FinishReason]
    FINISH_REASON_STOP: _ClassVar[FinishReason]
    FINISH_REASON_ABORT: _ClassVar[FinishReason]
FINISH_REASON_UNSPECIFIED: FinishReason
FINISH_REASON_LENGTH: FinishReason
FINISH_REASON_STOP: FinishReason
FINISH_REASON_ABORT: FinishReason

class TokenIds(_message.Message):
    __slots__ = ("ids",)
    IDS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, ids: _Optional[_Iterable[int]] = ...) -> None: ...

class SamplingOptions(_message.Message):
    __slots__ = ("temperature", "top_p", "top_k", "max_tokens", "min_tokens", "stop", "stop_token_ids", "seed", "ignore_eos")
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MIN_TOKENS_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    STOP_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    IGNORE_EOS_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_p: float
    top_k: int
    max_tokens: int
    min_tokens: int
    stop: _containers.RepeatedScalarFieldContainer[str]
    stop_token_ids: _containers.RepeatedScalarFieldContainer[int]
    seed: int
    ignore_eos: bool
    def __init__(self, temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., top_k: _Optional[int] = ..., max_tokens: _Optional[int] = ..., min_tokens: _Optional[int] = ..., stop: _Optional[_Iterable[str]] = ..., stop_token_ids: _Optional[_Iterable[int]] = ..., seed: _Optional[int] = ..., ignore_eos: _Optional[bool] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("text", "token_ids", "sampling", "priority", "request_id", "session_id")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    text: str
    token_ids: TokenIds
    sampling: SamplingOptions
    priority: int
    request_id: str
    session_id: str
    def __init__(self, text: _Optional[str] = ..., token_ids: _Optional[_Union[TokenIds, _Mapping]] = ..., sampling: _Optional[_Union[SamplingOptions, _Mapping]] = ..., priority: _Optional[int] = ..., request_id: _Optional[str] = ..., session_id: _Optional[str] = ...) -> None: ...

class Usage(_message.Message):
    __slots__ = ("prompt_tokens", "completion_tokens")
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    prompt_tokens: int
    completion_tokens: int
    def __init__(self, prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("request_id", "token_ids", "text", "finished", "finish_reason", "usage", "served_by", "stop_reason")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    SERVED_BY_FIELD_NUMBER: _ClassVar[int]
    STOP_REASON_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    text: str
    finished: bool
    finish_reason: FinishReason
    usage: Usage
    served_by: _containers.RepeatedScalarFieldContainer[str]
    stop_reason: str
    def __init__(self, request_id: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., text: _Optional[str] = ..., finished: _Optional[bool] = ..., finish_reason: _Optional[_Union[FinishReason, str]] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ..., served_by: _Optional[_Iterable[str]] = ..., stop_reason: _Optional[str] = ...) -> None: ...

class AbortRequest(_message.Message):
    __slots__ = ("request_id",)
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    def __init__(self, request_id: _Optional[str] = ...) -> None: ...

class AbortResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetModelInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("model", "max_model_len", "vocab_size", "block_size", "eos_token_ids", "bos_token_id", "default_max_tokens", "max_prompt_tokens")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MAX_MODEL_LEN_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    EOS_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    BOS_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    model: str
    max_model_len: int
    vocab_size: int
    block_size: int
    eos_token_ids: _containers.RepeatedScalarFieldContainer[int]
    bos_token_id: int
    default_max_tokens: int
    max_prompt_tokens: int
    def __init__(self, model: _Optional[str] = ..., max_model_len: _Optional[int] = ..., vocab_size: _Optional[int] = ..., block_size: _Optional[int] = ..., eos_token_ids: _Optional[_Iterable[int]] = ..., bos_token_id: _Optional[int] = ..., default_max_tokens: _Optional[int] = ..., max_prompt_tokens: _Optional[int] = ...) -> None: ...

class GetClusterStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class InstanceLoad(_message.Message):
    __slots__ = ("num_total_blocks", "num_free_blocks", "num_running", "num_waiting", "queued_prompt_tokens", "kv_usage")
    NUM_TOTAL_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    NUM_FREE_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    NUM_RUNNING_FIELD_NUMBER: _ClassVar[int]
    NUM_WAITING_FIELD_NUMBER: _ClassVar[int]
    QUEUED_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    KV_USAGE_FIELD_NUMBER: _ClassVar[int]
    num_total_blocks: int
    num_free_blocks: int
    num_running: int
    num_waiting: int
    queued_prompt_tokens: int
    kv_usage: float
    def __init__(self, num_total_blocks: _Optional[int] = ..., num_free_blocks: _Optional[int] = ..., num_running: _Optional[int] = ..., num_waiting: _Optional[int] = ..., queued_prompt_tokens: _Optional[int] = ..., kv_usage: _Optional[float] = ...) -> None: ...

class KVTransferStats(_message.Message):
    __slots__ = ("bytes_received", "bytes_sent", "transfers_in", "transfers_out", "failures", "expired_holds", "seconds_in_total", "last_latency_s", "blocks_held")
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    BYTES_SENT_FIELD_NUMBER: _ClassVar[int]
    TRANSFERS_IN_FIELD_NUMBER: _ClassVar[int]
    TRANSFERS_OUT_FIELD_NUMBER: _ClassVar[int]
    FAILURES_FIELD_NUMBER: _ClassVar[int]
    EXPIRED_HOLDS_FIELD_NUMBER: _ClassVar[int]
    SECONDS_IN_TOTAL_FIELD_NUMBER: _ClassVar[int]
    LAST_LATENCY_S_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_HELD_FIELD_NUMBER: _ClassVar[int]
    bytes_received: int
    bytes_sent: int
    transfers_in: int
    transfers_out: int
    failures: int
    expired_holds: int
    seconds_in_total: float
    last_latency_s: float
    blocks_held: int
    def __init__(self, bytes_received: _Optional[int] = ..., bytes_sent: _Optional[int] = ..., transfers_in: _Optional[int] = ..., transfers_out: _Optional[int] = ..., failures: _Optional[int] = ..., expired_holds: _Optional[int] = ..., seconds_in_total: _Optional[float] = ..., last_latency_s: _Optional[float] = ..., blocks_held: _Optional[int] = ...) -> None: ...

class SpecDecodeStats(_message.Message):
    __slots__ = ("num_speculative_tokens", "steps", "request_steps", "proposed", "planned", "verified", "accepted", "verified_request_steps", "window_fallbacks", "acceptance_rate", "mean_accepted_per_request_step", "budget_mode", "steps_without_speculation", "draft_skipped_steps", "explorations", "proposal_length_steps", "budget_bucket_bounds", "budget_bucket_counts", "budget_sum", "expected_accepted", "coupled_request_steps", "calibration_observations", "calibration_brier_raw", "calibration_brier_calibrated", "step_time_samples", "step_time_predicted_mean_ms", "step_time_measured_mean_ms", "step_time_abs_error_mean_ms")
    NUM_SPECULATIVE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_STEPS_FIELD_NUMBER: _ClassVar[int]
    PROPOSED_FIELD_NUMBER: _ClassVar[int]
    PLANNED_FIELD_NUMBER: _ClassVar[int]
    VERIFIED_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    VERIFIED_REQUEST_STEPS_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FALLBACKS_FIELD_NUMBER: _ClassVar[int]
    ACCEPTANCE_RATE_FIELD_NUMBER: _ClassVar[int]
    MEAN_ACCEPTED_PER_REQUEST_STEP_FIELD_NUMBER: _ClassVar[int]
    BUDGET_MODE_FIELD_NUMBER: _ClassVar[int]
    STEPS_WITHOUT_SPECULATION_FIELD_NUMBER: _ClassVar[int]
    DRAFT_SKIPPED_STEPS_FIELD_NUMBER: _ClassVar[int]
    EXPLORATIONS_FIELD_NUMBER: _ClassVar[int]
    PROPOSAL_LENGTH_STEPS_FIELD_NUMBER: _ClassVar[int]
    BUDGET_BUCKET_BOUNDS_FIELD_NUMBER: _ClassVar[int]
    BUDGET_BUCKET_COUNTS_FIELD_NUMBER: _ClassVar[int]
    BUDGET_SUM_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    COUPLED_REQUEST_STEPS_FIELD_NUMBER: _ClassVar[int]
    CALIBRATION_OBSERVATIONS_FIELD_NUMBER: _ClassVar[int]
    CALIBRATION_BRIER_RAW_FIELD_NUMBER: _ClassVar[int]
    CALIBRATION_BRIER_CALIBRATED_FIELD_NUMBER: _ClassVar[int]
    STEP_TIME_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    STEP_TIME_PREDICTED_MEAN_MS_FIELD_NUMBER: _ClassVar[int]
    STEP_TIME_MEASURED_MEAN_MS_FIELD_NUMBER: _ClassVar[int]
    STEP_TIME_ABS_ERROR_MEAN_MS_FIELD_NUMBER: _ClassVar[int]
    num_speculative_tokens: int
    steps: int
    request_steps: int
    proposed: int
    planned: int
    verified: int
    accepted: int
    verified_request_steps: int
    window_fallbacks: int
    acceptance_rate: float
    mean_accepted_per_request_step: float
    budget_mode: str
    steps_without_speculation: int
    draft_skipped_steps: int
    explorations: int
    proposal_length_steps: _containers.RepeatedScalarFieldContainer[int]
    budget_bucket_bounds: _containers.RepeatedScalarFieldContainer[float]
    budget_bucket_counts: _containers.RepeatedScalarFieldContainer[int]
    budget_sum: int
    expected_accepted: float
    coupled_request_steps: int
    calibration_observations: int
    calibration_brier_raw: float
    calibration_brier_calibrated: float
    step_time_samples: int
    step_time_predicted_mean_ms: float
    step_time_measured_mean_ms: float
    step_time_abs_error_mean_ms: float
    def __init__(self, num_speculative_tokens: _Optional[int] = ..., steps: _Optional[int] = ..., request_steps: _Optional[int] = ..., proposed: _Optional[int] = ..., planned: _Optional[int] = ..., verified: _Optional[int] = ..., accepted: _Optional[int] = ..., verified_request_steps: _Optional[int] = ..., window_fallbacks: _Optional[int] = ..., acceptance_rate: _Optional[float] = ..., mean_accepted_per_request_step: _Optional[float] = ..., budget_mode: _Optional[str] = ..., steps_without_speculation: _Optional[int] = ..., draft_skipped_steps: _Optional[int] = ..., explorations: _Optional[int] = ..., proposal_length_steps: _Optional[_Iterable[int]] = ..., budget_bucket_bounds: _Optional[_Iterable[float]] = ..., budget_bucket_counts: _Optional[_Iterable[int]] = ..., budget_sum: _Optional[int] = ..., expected_accepted: _Optional[float] = ..., coupled_request_steps: _Optional[int] = ..., calibration_observations: _Optional[int] = ..., calibration_brier_raw: _Optional[float] = ..., calibration_brier_calibrated: _Optional[float] = ..., step_time_samples: _Optional[int] = ..., step_time_predicted_mean_ms: _Optional[float] = ..., step_time_measured_mean_ms: _Optional[float] = ..., step_time_abs_error_mean_ms: _Optional[float] = ...) -> None: ...

class InstanceStatus(_message.Message):
    __slots__ = ("instance_id", "role", "state", "node_id", "load", "requests_served", "tokens_generated", "prompt_tokens_computed", "kv_transfer", "death_reason", "spec_decode", "restarts", "pid", "tensor_parallel_size", "rank_pids", "prefix_cache")
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_SERVED_FIELD_NUMBER: _ClassVar[int]
    TOKENS_GENERATED_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_COMPUTED_FIELD_NUMBER: _ClassVar[int]
    KV_TRANSFER_FIELD_NUMBER: _ClassVar[int]
    DEATH_REASON_FIELD_NUMBER: _ClassVar[int]
    SPEC_DECODE_FIELD_NUMBER: _ClassVar[int]
    RESTARTS_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    TENSOR_PARALLEL_SIZE_FIELD_NUMBER: _ClassVar[int]
    RANK_PIDS_FIELD_NUMBER: _ClassVar[int]
    PREFIX_CACHE_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    role: str
    state: str
    node_id: str
    load: InstanceLoad
    requests_served: int
    tokens_generated: int
    prompt_tokens_computed: int
    kv_transfer: KVTransferStats
    death_reason: str
    spec_decode: SpecDecodeStats
    restarts: int
    pid: int
    tensor_parallel_size: int
    rank_pids: _containers.RepeatedScalarFieldContainer[int]
    prefix_cache: PrefixCacheStats
    def __init__(self, instance_id: _Optional[str] = ..., role: _Optional[str] = ..., state: _Optional[str] = ..., node_id: _Optional[str] = ..., load: _Optional[_Union[InstanceLoad, _Mapping]] = ..., requests_served: _Optional[int] = ..., tokens_generated: _Optional[int] = ..., prompt_tokens_computed: _Optional[int] = ..., kv_transfer: _Optional[_Union[KVTransferStats, _Mapping]] = ..., death_reason: _Optional[str] = ..., spec_decode: _Optional[_Union[SpecDecodeStats, _Mapping]] = ..., restarts: _Optional[int] = ..., pid: _Optional[int] = ..., tensor_parallel_size: _Optional[int] = ..., rank_pids: _Optional[_Iterable[int]] = ..., prefix_cache: _Optional[_Union[PrefixCacheStats, _Mapping]] = ...) -> None: ...

class PrefixCacheStats(_message.Message):
    __slots__ = ("query_tokens", "hit_tokens_device", "hit_rate", "cached_blocks")
    QUERY_TOKENS_FIELD_NUMBER: _ClassVar[int]
    HIT_TOKENS_DEVICE_FIELD_NUMBER: _ClassVar[int]
    HIT_RATE_FIELD_NUMBER: _ClassVar[int]
    CACHED_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    query_tokens: int
    hit_tokens_device: int
    hit_rate: float
    cached_blocks: int
    def __init__(self, query_tokens: _Optional[int] = ..., hit_tokens_device: _Optional[int] = ..., hit_rate: _Optional[float] = ..., cached_blocks: _Optional[int] = ...) -> None: ...

class RoutingStats(_message.Message):
    __slots__ = ("policy", "decisions", "expected_cached_tokens", "sessions")
    class DecisionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    class ExpectedCachedTokensEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    POLICY_FIELD_NUMBER: _ClassVar[int]
    DECISIONS_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    policy: str
    decisions: _containers.ScalarMap[str, int]
    expected_cached_tokens: _containers.ScalarMap[str, int]
    sessions: int
    def __init__(self, policy: _Optional[str] = ..., decisions: _Optional[_Mapping[str, int]] = ..., expected_cached_tokens: _Optional[_Mapping[str, int]] = ..., sessions: _Optional[int] = ...) -> None: ...

class ClusterStatus(_message.Message):
    __slots__ = ("model", "instances", "requests_in_flight", "requests_total", "uptime_s", "mode", "migrations", "frontends", "scheduler", "deployment", "frontend_id", "routing")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    INSTANCES_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    UPTIME_S_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    MIGRATIONS_FIELD_NUMBER: _ClassVar[int]
    FRONTENDS_FIELD_NUMBER: _ClassVar[int]
    SCHEDULER_FIELD_NUMBER: _ClassVar[int]
    DEPLOYMENT_FIELD_NUMBER: _ClassVar[int]
    FRONTEND_ID_FIELD_NUMBER: _ClassVar[int]
    ROUTING_FIELD_NUMBER: _ClassVar[int]
    model: str
    instances: _containers.RepeatedCompositeFieldContainer[InstanceStatus]
    requests_in_flight: int
    requests_total: int
    uptime_s: float
    mode: str
    migrations: MigrationStats
    frontends: _containers.RepeatedCompositeFieldContainer[FrontEndStatus]
    scheduler: SchedulerStatus
    deployment: str
    frontend_id: str
    routing: RoutingStats
    def __init__(self, model: _Optional[str] = ..., instances: _Optional[_Iterable[_Union[InstanceStatus, _Mapping]]] = ..., requests_in_flight: _Optional[int] = ..., requests_total: _Optional[int] = ..., uptime_s: _Optional[float] = ..., mode: _Optional[str] = ..., migrations: _Optional[_Union[MigrationStats, _Mapping]] = ..., frontends: _Optional[_Iterable[_Union[FrontEndStatus, _Mapping]]] = ..., scheduler: _Optional[_Union[SchedulerStatus, _Mapping]] = ..., deployment: _Optional[str] = ..., frontend_id: _Optional[str] = ..., routing: _Optional[_Union[RoutingStats, _Mapping]] = ...) -> None: ...

class FrontEndStatus(_message.Message):
    __slots__ = ("frontend_id", "address", "pid", "node_id", "state", "requests_in_flight", "requests_total", "uptime_s", "last_seen_s")
    FRONTEND_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    UPTIME_S_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_S_FIELD_NUMBER: _ClassVar[int]
    frontend_id: str
    address: str
    pid: int
    node_id: str
    state: str
    requests_in_flight: int
    requests_total: int
    uptime_s: float
    last_seen_s: float
    def __init__(self, frontend_id: _Optional[str] = ..., address: _Optional[str] = ..., pid: _Optional[int] = ..., node_id: _Optional[str] = ..., state: _Optional[str] = ..., requests_in_flight: _Optional[int] = ..., requests_total: _Optional[int] = ..., uptime_s: _Optional[float] = ..., last_seen_s: _Optional[float] = ...) -> None: ...

class SchedulerStatus(_message.Message):
    __slots__ = ("state", "uptime_s", "restarts", "pid")
    STATE_FIELD_NUMBER: _ClassVar[int]
    UPTIME_S_FIELD_NUMBER: _ClassVar[int]
    RESTARTS_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    state: str
    uptime_s: float
    restarts: int
    pid: int
    def __init__(self, state: _Optional[str] = ..., uptime_s: _Optional[float] = ..., restarts: _Optional[int] = ..., pid: _Optional[int] = ...) -> None: ...

class MigrateRequest(_message.Message):
    __slots__ = ("request_id", "target_instance")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TARGET_INSTANCE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    target_instance: str
    def __init__(self, request_id: _Optional[str] = ..., target_instance: _Optional[str] = ...) -> None: ...

class MigrationInfo(_message.Message):
    __slots__ = ("migration_id", "request_id", "source", "target", "state", "reason", "trigger", "stages", "blocks_copied", "tokens_moved", "downtime_s", "duration_s", "phases_s")
    class PhasesSEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    MIGRATION_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    TRIGGER_FIELD_NUMBER: _ClassVar[int]
    STAGES_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_COPIED_FIELD_NUMBER: _ClassVar[int]
    TOKENS_MOVED_FIELD_NUMBER: _ClassVar[int]
    DOWNTIME_S_FIELD_NUMBER: _ClassVar[int]
    DURATION_S_FIELD_NUMBER: _ClassVar[int]
    PHASES_S_FIELD_NUMBER: _ClassVar[int]
    migration_id: str
    request_id: str
    source: str
    target: str
    state: str
    reason: str
    trigger: str
    stages: int
    blocks_copied: int
    tokens_moved: int
    downtime_s: float
    duration_s: float
    phases_s: _containers.ScalarMap[str, float]
    def __init__(self, migration_id: _Optional[str] = ..., request_id: _Optional[str] = ..., source: _Optional[str] = ..., target: _Optional[str] = ..., state: _Optional[str] = ..., reason: _Optional[str] = ..., trigger: _Optional[str] = ..., stages: _Optional[int] = ..., blocks_copied: _Optional[int] = ..., tokens_moved: _Optional[int] = ..., downtime_s: _Optional[float] = ..., duration_s: _Optional[float] = ..., phases_s: _Optional[_Mapping[str, float]] = ...) -> None: ...

class MigrateResponse(_message.Message):
    __slots__ = ("migration",)
    MIGRATION_FIELD_NUMBER: _ClassVar[int]
    migration: MigrationInfo
    def __init__(self, migration: _Optional[_Union[MigrationInfo, _Mapping]] = ...) -> None: ...

class DrainRequest(_message.Message):
    __slots__ = ("instance_id", "timeout_s", "cancel")
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    CANCEL_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    timeout_s: float
    cancel: bool
    def __init__(self, instance_id: _Optional[str] = ..., timeout_s: _Optional[float] = ..., cancel: _Optional[bool] = ...) -> None: ...

class DrainResponse(_message.Message):
    __slots__ = ("instance_id", "migrated", "remaining", "failed", "migrations")
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    MIGRATED_FIELD_NUMBER: _ClassVar[int]
    REMAINING_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    MIGRATIONS_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    migrated: int
    remaining: int
    failed: int
    migrations: _containers.RepeatedCompositeFieldContainer[MigrationInfo]
    def __init__(self, instance_id: _Optional[str] = ..., migrated: _Optional[int] = ..., remaining: _Optional[int] = ..., failed: _Optional[int] = ..., migrations: _Optional[_Iterable[_Union[MigrationInfo, _Mapping]]] = ...) -> None: ...

class MigrationStats(_message.Message):
    __slots__ = ("started", "committed", "aborted", "aborted_by_reason", "blocks_copied", "downtime_last_s", "downtime_mean_s", "downtime_p50_s", "downtime_p99_s", "downtime_max_s", "in_flight")
    class AbortedByReasonEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    STARTED_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_FIELD_NUMBER: _ClassVar[int]
    ABORTED_FIELD_NUMBER: _ClassVar[int]
    ABORTED_BY_REASON_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_COPIED_FIELD_NUMBER: _ClassVar[int]
    DOWNTIME_LAST_S_FIELD_NUMBER: _ClassVar[int]
    DOWNTIME_MEAN_S_FIELD_NUMBER: _ClassVar[int]
    DOWNTIME_P50_S_FIELD_NUMBER: _ClassVar[int]
    DOWNTIME_P99_S_FIELD_NUMBER: _ClassVar[int]
    DOWNTIME_MAX_S_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    started: int
    committed: int
    aborted: int
    aborted_by_reason: _containers.ScalarMap[str, int]
    blocks_copied: int
    downtime_last_s: float
    downtime_mean_s: float
    downtime_p50_s: float
    downtime_p99_s: float
    downtime_max_s: float
    in_flight: _containers.RepeatedCompositeFieldContainer[MigrationInfo]
    def __init__(self, started: _Optional[int] = ..., committed: _Optional[int] = ..., aborted: _Optional[int] = ..., aborted_by_reason: _Optional[_Mapping[str, int]] = ..., blocks_copied: _Optional[int] = ..., downtime_last_s: _Optional[float] = ..., downtime_mean_s: _Optional[float] = ..., downtime_p50_s: _Optional[float] = ..., downtime_p99_s: _Optional[float] = ..., downtime_max_s: _Optional[float] = ..., in_flight: _Optional[_Iterable[_Union[MigrationInfo, _Mapping]]] = ...) -> None: ...
