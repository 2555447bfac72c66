from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Array(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class LookupRequest(_message.Message):
    __slots__ = ("fingerprint", "row_ids", "seq")
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    ROW_IDS_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    fingerprint: str
    row_ids: Array
    seq: int
    def __init__(self, fingerprint: _Optional[str] = ..., row_ids: _Optional[_Union[Array, _Mapping]] = ..., seq: _Optional[int] = ...) -> None: ...

class LookupResponse(_message.Message):
    __slots__ = ("rows", "update_count", "seq")
    ROWS_FIELD_NUMBER: _ClassVar[int]
    UPDATE_COUNT_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    rows: Array
    update_count: int
    seq: int
    def __init__(self, rows: _Optional[_Union[Array, _Mapping]] = ..., update_count: _Optional[int] = ..., seq: _Optional[int] = ...) -> None: ...

class ApplyGradientsRequest(_message.Message):
    __slots__ = ("fingerprint", "row_ids", "grads", "request_id", "lr")
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    ROW_IDS_FIELD_NUMBER: _ClassVar[int]
    GRADS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    LR_FIELD_NUMBER: _ClassVar[int]
    fingerprint: str
    row_ids: Array
    grads: Array
    request_id: str
    lr: float
    def __init__(self, fingerprint: _Optional[str] = ..., row_ids: _Optional[_Union[Array, _Mapping]] = ..., grads: _Optional[_Union[Array, _Mapping]] = ..., request_id: _Optional[str] = ..., lr: _Optional[float] = ...) -> None: ...

class ApplyGradientsResponse(_message.Message):
    __slots__ = ("rows_updated", "update_count")
    ROWS_UPDATED_FIELD_NUMBER: _ClassVar[int]
    UPDATE_COUNT_FIELD_NUMBER: _ClassVar[int]
    rows_updated: int
    update_count: int
    def __init__(self, rows_updated: _Optional[int] = ..., update_count: _Optional[int] = ...) -> None: ...

class DescribeRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ShardCounters(_message.Message):
    __slots__ = ("lookups", "rows_served", "bytes_served", "updates", "rows_updated", "rejected", "lookup_seconds", "lookup_p50_ms", "lookup_p99_ms", "uptime_s")
    LOOKUPS_FIELD_NUMBER: _ClassVar[int]
    ROWS_SERVED_FIELD_NUMBER: _ClassVar[int]
    BYTES_SERVED_FIELD_NUMBER: _ClassVar[int]
    UPDATES_FIELD_NUMBER: _ClassVar[int]
    ROWS_UPDATED_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    LOOKUP_SECONDS_FIELD_NUMBER: _ClassVar[int]
    LOOKUP_P50_MS_FIELD_NUMBER: _ClassVar[int]
    LOOKUP_P99_MS_FIELD_NUMBER: _ClassVar[int]
    UPTIME_S_FIELD_NUMBER: _ClassVar[int]
    lookups: int
    rows_served: int
    bytes_served: int
    updates: int
    rows_updated: int
    rejected: int
    lookup_seconds: float
    lookup_p50_ms: float
    lookup_p99_ms: float
    uptime_s: float
    def __init__(self, lookups: _Optional[int] = ..., rows_served: _Optional[int] = ..., bytes_served: _Optional[int] = ..., updates: _Optional[int] = ..., rows_updated: _Optional[int] = ..., rejected: _Optional[int] = ..., lookup_seconds: _Optional[float] = ..., lookup_p50_ms: _Optional[float] = ..., lookup_p99_ms: _Optional[float] = ..., uptime_s: _Optional[float] = ...) -> None: ...

class DescribeResponse(_message.Message):
    __slots__ = ("fingerprint", "shard_index", "num_shards", "row_start", "row_stop", "dim", "dtype", "optimizer", "resident_bytes", "max_message_bytes", "counters", "resident_rows", "max_ids_per_request", "rss_bytes", "role", "replica", "primary", "backups", "state", "rows_from", "notes", "storage", "mapped_bytes", "mapped_resident_bytes", "table_use", "reads_top1pct_share", "reads_top10pct_share", "reads")
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    SHARD_INDEX_FIELD_NUMBER: _ClassVar[int]
    NUM_SHARDS_FIELD_NUMBER: _ClassVar[int]
    ROW_START_FIELD_NUMBER: _ClassVar[int]
    ROW_STOP_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    RESIDENT_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    COUNTERS_FIELD_NUMBER: _ClassVar[int]
    RESIDENT_ROWS_FIELD_NUMBER: _ClassVar[int]
    MAX_IDS_PER_REQUEST_FIELD_NUMBER: _ClassVar[int]
    RSS_BYTES_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    PRIMARY_FIELD_NUMBER: _ClassVar[int]
    BACKUPS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ROWS_FROM_FIELD_NUMBER: _ClassVar[int]
    NOTES_FIELD_NUMBER: _ClassVar[int]
    STORAGE_FIELD_NUMBER: _ClassVar[int]
    MAPPED_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAPPED_RESIDENT_BYTES_FIELD_NUMBER: _ClassVar[int]
    TABLE_USE_FIELD_NUMBER: _ClassVar[int]
    READS_TOP1PCT_SHARE_FIELD_NUMBER: _ClassVar[int]
    READS_TOP10PCT_SHARE_FIELD_NUMBER: _ClassVar[int]
    READS_FIELD_NUMBER: _ClassVar[int]
    fingerprint: str
    shard_index: int
    num_shards: int
    row_start: int
    row_stop: int
    dim: int
    dtype: str
    optimizer: str
    resident_bytes: int
    max_message_bytes: int
    counters: ShardCounters
    resident_rows: int
    max_ids_per_request: int
    rss_bytes: int
    role: str
    replica: int
    primary: int
    backups: _containers.RepeatedScalarFieldContainer[str]
    state: str
    rows_from: str
    notes: _containers.RepeatedScalarFieldContainer[str]
    storage: str
    mapped_bytes: int
    mapped_resident_bytes: int
    table_use: _containers.RepeatedCompositeFieldContainer[TableUse]
    reads_top1pct_share: float
    reads_top10pct_share: float
    reads: int
    def __init__(self, fingerprint: _Optional[str] = ..., shard_index: _Optional[int] = ..., num_shards: _Optional[int] = ..., row_start: _Optional[int] = ..., row_stop: _Optional[int] = ..., dim: _Optional[int] = ..., dtype: _Optional[str] = ..., optimizer: _Optional[str] = ..., resident_bytes: _Optional[int] = ..., max_message_bytes: _Optional[int] = ..., counters: _Optional[_Union[ShardCounters, _Mapping]] = ..., resident_rows: _Optional[int] = ..., max_ids_per_request: _Optional[int] = ..., rss_bytes: _Optional[int] = ..., role: _Optional[str] = ..., replica: _Optional[int] = ..., primary: _Optional[int] = ..., backups: _Optional[_Iterable[str]] = ..., state: _Optional[str] = ..., rows_from: _Optional[str] = ..., notes: _Optional[_Iterable[str]] = ..., storage: _Optional[str] = ..., mapped_bytes: _Optional[int] = ..., mapped_resident_bytes: _Optional[int] = ..., table_use: _Optional[_Iterable[_Union[TableUse, _Mapping]]] = ..., reads_top1pct_share: _Optional[float] = ..., reads_top10pct_share: _Optional[float] = ..., reads: _Optional[int] = ...) -> None: ...

class TableUse(_message.Message):
    __slots__ = ("layer", "order", "rows", "touched")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    ORDER_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    TOUCHED_FIELD_NUMBER: _ClassVar[int]
    layer: int
    order: int
    rows: int
    touched: float
    def __init__(self, layer: _Optional[int] = ..., order: _Optional[int] = ..., rows: _Optional[int] = ..., touched: _Optional[float] = ...) -> None: ...

class SaveRequest(_message.Message):
    __slots__ = ("directory",)
    DIRECTORY_FIELD_NUMBER: _ClassVar[int]
    directory: str
    def __init__(self, directory: _Optional[str] = ...) -> None: ...

class SaveResponse(_message.Message):
    __slots__ = ("header_path", "sha256")
    HEADER_PATH_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    header_path: str
    sha256: str
    def __init__(self, header_path: _Optional[str] = ..., sha256: _Optional[str] = ...) -> None: ...

class ForwardRequest(_message.Message):
    __slots__ = ("push", "primary", "seq")
    PUSH_FIELD_NUMBER: _ClassVar[int]
    PRIMARY_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    push: ApplyGradientsRequest
    primary: int
    seq: int
    def __init__(self, push: _Optional[_Union[ApplyGradientsRequest, _Mapping]] = ..., primary: _Optional[int] = ..., seq: _Optional[int] = ...) -> None: ...

class SnapshotRequest(_message.Message):
    __slots__ = ("fingerprint", "join_address", "join_index")
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    JOIN_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    JOIN_INDEX_FIELD_NUMBER: _ClassVar[int]
    fingerprint: str
    join_address: str
    join_index: int
    def __init__(self, fingerprint: _Optional[str] = ..., join_address: _Optional[str] = ..., join_index: _Optional[int] = ...) -> None: ...

class SnapshotChunk(_message.Message):
    __slots__ = ("part", "row_offset", "data", "primary", "applied_ids", "applied_rows", "seq")
    PART_FIELD_NUMBER: _ClassVar[int]
    ROW_OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    PRIMARY_FIELD_NUMBER: _ClassVar[int]
    APPLIED_IDS_FIELD_NUMBER: _ClassVar[int]
    APPLIED_ROWS_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    part: str
    row_offset: int
    data: Array
    primary: int
    applied_ids: _containers.RepeatedScalarFieldContainer[str]
    applied_rows: _containers.RepeatedScalarFieldContainer[int]
    seq: int
    def __init__(self, part: _Optional[str] = ..., row_offset: _Optional[int] = ..., data: _Optional[_Union[Array, _Mapping]] = ..., primary: _Optional[int] = ..., applied_ids: _Optional[_Iterable[str]] = ..., applied_rows: _Optional[_Iterable[int]] = ..., seq: _Optional[int] = ...) -> None: ...
