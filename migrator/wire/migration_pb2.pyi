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

class HandshakeRequest(_message.Message):
    __slots__ = ("protocol_version", "prepare_only")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    PREPARE_ONLY_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    prepare_only: bool
    def __init__(self, protocol_version: _Optional[int] = ..., prepare_only: _Optional[bool] = ...) -> None: ...

class Manifest(_message.Message):
    __slots__ = ("protocol_version", "migration_id", "ram_size", "page_size", "vcpu_state", "zero_map_zstd", "paused_unix_ns", "vcpus", "ops_per_s_before", "guest_pid")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    MIGRATION_ID_FIELD_NUMBER: _ClassVar[int]
    RAM_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    VCPU_STATE_FIELD_NUMBER: _ClassVar[int]
    ZERO_MAP_ZSTD_FIELD_NUMBER: _ClassVar[int]
    PAUSED_UNIX_NS_FIELD_NUMBER: _ClassVar[int]
    VCPUS_FIELD_NUMBER: _ClassVar[int]
    OPS_PER_S_BEFORE_FIELD_NUMBER: _ClassVar[int]
    GUEST_PID_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    migration_id: str
    ram_size: int
    page_size: int
    vcpu_state: bytes
    zero_map_zstd: bytes
    paused_unix_ns: int
    vcpus: int
    ops_per_s_before: float
    guest_pid: int
    def __init__(self, protocol_version: _Optional[int] = ..., migration_id: _Optional[str] = ..., ram_size: _Optional[int] = ..., page_size: _Optional[int] = ..., vcpu_state: _Optional[bytes] = ..., zero_map_zstd: _Optional[bytes] = ..., paused_unix_ns: _Optional[int] = ..., vcpus: _Optional[int] = ..., ops_per_s_before: _Optional[float] = ..., guest_pid: _Optional[int] = ...) -> None: ...

class DemandRequest(_message.Message):
    __slots__ = ("request_id", "first_page", "count")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    FIRST_PAGE_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    request_id: int
    first_page: int
    count: int
    def __init__(self, request_id: _Optional[int] = ..., first_page: _Optional[int] = ..., count: _Optional[int] = ...) -> None: ...

class StreamControl(_message.Message):
    __slots__ = ("seek_page", "codec", "batch_pages", "missing_map_zstd")
    SEEK_PAGE_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    BATCH_PAGES_FIELD_NUMBER: _ClassVar[int]
    MISSING_MAP_ZSTD_FIELD_NUMBER: _ClassVar[int]
    seek_page: int
    codec: Codec
    batch_pages: int
    missing_map_zstd: bytes
    def __init__(self, seek_page: _Optional[int] = ..., codec: _Optional[_Union[Codec, str]] = ..., batch_pages: _Optional[int] = ..., missing_map_zstd: _Optional[bytes] = ...) -> None: ...

class PageBatch(_message.Message):
    __slots__ = ("request_id", "first_page", "count", "flags", "codec", "data", "raw_size", "crc32", "last", "sent_unix_ns", "zero_map_zstd")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    FIRST_PAGE_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    FLAGS_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    RAW_SIZE_FIELD_NUMBER: _ClassVar[int]
    CRC32_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    SENT_UNIX_NS_FIELD_NUMBER: _ClassVar[int]
    ZERO_MAP_ZSTD_FIELD_NUMBER: _ClassVar[int]
    request_id: int
    first_page: int
    count: int
    flags: bytes
    codec: Codec
    data: bytes
    raw_size: int
    crc32: _containers.RepeatedScalarFieldContainer[int]
    last: bool
    sent_unix_ns: int
    zero_map_zstd: bytes
    def __init__(self, request_id: _Optional[int] = ..., first_page: _Optional[int] = ..., count: _Optional[int] = ..., flags: _Optional[bytes] = ..., codec: _Optional[_Union[Codec, str]] = ..., data: _Optional[bytes] = ..., raw_size: _Optional[int] = ..., crc32: _Optional[_Iterable[int]] = ..., last: _Optional[bool] = ..., sent_unix_ns: _Optional[int] = ..., zero_map_zstd: _Optional[bytes] = ...) -> None: ...

class CompleteRequest(_message.Message):
    __slots__ = ("migration_id", "pages_installed")
    MIGRATION_ID_FIELD_NUMBER: _ClassVar[int]
    PAGES_INSTALLED_FIELD_NUMBER: _ClassVar[int]
    migration_id: str
    pages_installed: int
    def __init__(self, migration_id: _Optional[str] = ..., pages_installed: _Optional[int] = ...) -> None: ...

class CompleteReply(_message.Message):
    __slots__ = ("pages_served", "bytes_sent")
    PAGES_SERVED_FIELD_NUMBER: _ClassVar[int]
    BYTES_SENT_FIELD_NUMBER: _ClassVar[int]
    pages_served: int
    bytes_sent: int
    def __init__(self, pages_served: _Optional[int] = ..., bytes_sent: _Optional[int] = ...) -> None: ...

class CancelRequest(_message.Message):
    __slots__ = ("migration_id", "reason")
    MIGRATION_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    migration_id: str
    reason: str
    def __init__(self, migration_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class CancelReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
