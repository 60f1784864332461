from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Codec(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CODEC_NONE: _ClassVar[Codec]
    CODEC_ZSTD: _ClassVar[Codec]
CODEC_NONE: Codec
CODEC_ZSTD: Codec

class DescribeRequest(_message.Message):
    __slots__ = ("protocol_version",)
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    def __init__(self, protocol_version: _Optional[int] = ...) -> None: ...

class HandshakeRequest(_message.Message):
    __slots__ = ("protocol_version", "session_token")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    SESSION_TOKEN_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    session_token: bytes
    def __init__(self, protocol_version: _Optional[int] = ..., session_token: _Optional[bytes] = ...) -> None: ...

class Manifest(_message.Message):
    __slots__ = ("protocol_version", "epoch", "ram_size", "page_size", "vcpu_state", "paused_unix_ns", "vcpus", "ops_per_s_before", "guest_pid", "switchover_timeout_ms", "urgent_port_offset", "lane_port_offsets", "stale_map_zstd", "precopy_pages", "precopy_rounds")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    RAM_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    VCPU_STATE_FIELD_NUMBER: _ClassVar[int]
    PAUSED_UNIX_NS_FIELD_NUMBER: _ClassVar[int]
    VCPUS_FIELD_NUMBER: _ClassVar[int]
    OPS_PER_S_BEFORE_FIELD_NUMBER: _ClassVar[int]
    GUEST_PID_FIELD_NUMBER: _ClassVar[int]
    SWITCHOVER_TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    URGENT_PORT_OFFSET_FIELD_NUMBER: _ClassVar[int]
    LANE_PORT_OFFSETS_FIELD_NUMBER: _ClassVar[int]
    STALE_MAP_ZSTD_FIELD_NUMBER: _ClassVar[int]
    PRECOPY_PAGES_FIELD_NUMBER: _ClassVar[int]
    PRECOPY_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    epoch: int
    ram_size: int
    page_size: int
    vcpu_state: bytes
    paused_unix_ns: int
    vcpus: int
    ops_per_s_before: float
    guest_pid: int
    switchover_timeout_ms: int
    urgent_port_offset: int
    lane_port_offsets: _containers.RepeatedScalarFieldContainer[int]
    stale_map_zstd: bytes
    precopy_pages: int
    precopy_rounds: int
    def __init__(self, protocol_version: _Optional[int] = ..., epoch: _Optional[int] = ..., ram_size: _Optional[int] = ..., page_size: _Optional[int] = ..., vcpu_state: _Optional[bytes] = ..., paused_unix_ns: _Optional[int] = ..., vcpus: _Optional[int] = ..., ops_per_s_before: _Optional[float] = ..., guest_pid: _Optional[int] = ..., switchover_timeout_ms: _Optional[int] = ..., urgent_port_offset: _Optional[int] = ..., lane_port_offsets: _Optional[_Iterable[int]] = ..., stale_map_zstd: _Optional[bytes] = ..., precopy_pages: _Optional[int] = ..., precopy_rounds: _Optional[int] = ...) -> None: ...

class PrecopyRequest(_message.Message):
    __slots__ = ("protocol_version", "session_token", "seconds", "auto", "track_only", "hot_first")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    SESSION_TOKEN_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    AUTO_FIELD_NUMBER: _ClassVar[int]
    TRACK_ONLY_FIELD_NUMBER: _ClassVar[int]
    HOT_FIRST_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    session_token: bytes
    seconds: float
    auto: bool
    track_only: bool
    hot_first: bool
    def __init__(self, protocol_version: _Optional[int] = ..., session_token: _Optional[bytes] = ..., seconds: _Optional[float] = ..., auto: _Optional[bool] = ..., track_only: _Optional[bool] = ..., hot_first: _Optional[bool] = ...) -> None: ...

class PrecopyProgress(_message.Message):
    __slots__ = ("epoch", "round", "round_pages", "dirty_pages", "sent_pages", "round_s", "done", "why", "stale_map_zstd")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    ROUND_PAGES_FIELD_NUMBER: _ClassVar[int]
    DIRTY_PAGES_FIELD_NUMBER: _ClassVar[int]
    SENT_PAGES_FIELD_NUMBER: _ClassVar[int]
    ROUND_S_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    WHY_FIELD_NUMBER: _ClassVar[int]
    STALE_MAP_ZSTD_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    round: int
    round_pages: int
    dirty_pages: int
    sent_pages: int
    round_s: float
    done: bool
    why: str
    stale_map_zstd: bytes
    def __init__(self, epoch: _Optional[int] = ..., round: _Optional[int] = ..., round_pages: _Optional[int] = ..., dirty_pages: _Optional[int] = ..., sent_pages: _Optional[int] = ..., round_s: _Optional[float] = ..., done: _Optional[bool] = ..., why: _Optional[str] = ..., stale_map_zstd: _Optional[bytes] = ...) -> None: ...

class SwitchoverRequest(_message.Message):
    __slots__ = ("epoch",)
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    def __init__(self, epoch: _Optional[int] = ...) -> None: ...

class SwitchoverReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DemandRequest(_message.Message):
    __slots__ = ("epoch", "request_id", "first_page", "count", "discarded")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    FIRST_PAGE_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    DISCARDED_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    request_id: int
    first_page: int
    count: int
    discarded: bool
    def __init__(self, epoch: _Optional[int] = ..., request_id: _Optional[int] = ..., first_page: _Optional[int] = ..., count: _Optional[int] = ..., discarded: _Optional[bool] = ...) -> None: ...

class StreamControl(_message.Message):
    __slots__ = ("epoch", "seek_page", "codec", "batch_pages", "missing_map_zstd", "lane", "lanes", "precopy")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    SEEK_PAGE_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    BATCH_PAGES_FIELD_NUMBER: _ClassVar[int]
    MISSING_MAP_ZSTD_FIELD_NUMBER: _ClassVar[int]
    LANE_FIELD_NUMBER: _ClassVar[int]
    LANES_FIELD_NUMBER: _ClassVar[int]
    PRECOPY_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    seek_page: int
    codec: Codec
    batch_pages: int
    missing_map_zstd: bytes
    lane: int
    lanes: int
    precopy: bool
    def __init__(self, epoch: _Optional[int] = ..., seek_page: _Optional[int] = ..., codec: _Optional[_Union[Codec, str]] = ..., batch_pages: _Optional[int] = ..., missing_map_zstd: _Optional[bytes] = ..., lane: _Optional[int] = ..., lanes: _Optional[int] = ..., precopy: _Optional[bool] = ...) -> None: ...

class PageBatch(_message.Message):
    __slots__ = ("epoch", "request_id", "first_page", "count", "flags", "codec", "data", "raw_size", "xxh3", "last", "sent_unix_ns", "zero_map_zstd", "round")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    FIRST_PAGE_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    FLAGS_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    RAW_SIZE_FIELD_NUMBER: _ClassVar[int]
    XXH3_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    SENT_UNIX_NS_FIELD_NUMBER: _ClassVar[int]
    ZERO_MAP_ZSTD_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    request_id: int
    first_page: int
    count: int
    flags: bytes
    codec: Codec
    data: bytes
    raw_size: int
    xxh3: int
    last: bool
    sent_unix_ns: int
    zero_map_zstd: bytes
    round: int
    def __init__(self, epoch: _Optional[int] = ..., request_id: _Optional[int] = ..., first_page: _Optional[int] = ..., count: _Optional[int] = ..., flags: _Optional[bytes] = ..., codec: _Optional[_Union[Codec, str]] = ..., data: _Optional[bytes] = ..., raw_size: _Optional[int] = ..., xxh3: _Optional[int] = ..., last: _Optional[bool] = ..., sent_unix_ns: _Optional[int] = ..., zero_map_zstd: _Optional[bytes] = ..., round: _Optional[int] = ...) -> None: ...

class CompleteRequest(_message.Message):
    __slots__ = ("epoch", "pages_installed", "ack")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    PAGES_INSTALLED_FIELD_NUMBER: _ClassVar[int]
    ACK_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    pages_installed: int
    ack: bool
    def __init__(self, epoch: _Optional[int] = ..., pages_installed: _Optional[int] = ..., ack: _Optional[bool] = ...) -> None: ...

class CompleteReply(_message.Message):
    __slots__ = ("pages_served", "bytes_sent")
    PAGES_SERVED_FIELD_NUMBER: _ClassVar[int]
    BYTES_SENT_FIELD_NUMBER: _ClassVar[int]
    pages_served: int
    bytes_sent: int
    def __init__(self, pages_served: _Optional[int] = ..., bytes_sent: _Optional[int] = ...) -> None: ...

class CancelRequest(_message.Message):
    __slots__ = ("epoch", "reason")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    reason: str
    def __init__(self, epoch: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class CancelReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RollbackRequest(_message.Message):
    __slots__ = ("force",)
    FORCE_FIELD_NUMBER: _ClassVar[int]
    force: bool
    def __init__(self, force: _Optional[bool] = ...) -> None: ...

class RollbackReply(_message.Message):
    __slots__ = ("message",)
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    message: str
    def __init__(self, message: _Optional[str] = ...) -> None: ...
