"""Wire format of vhost-user messages: header, request codes, feature bits and payload layouts.

Names follow QEMU ``docs/interop/vhost-user.rst`` ("Message Specification", "Protocol
features", "Front-end message types"). All numbers are in the machine's native byte order, as
the spec says; the layouts use ``=`` (native order, standard sizes, no implicit padding) and the
C structs' padding is spelled out.

This module only packs and unpacks bytes: it knows nothing of file descriptors, sockets,
connection state or guest memory.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import ClassVar, Self

__all__ = [
    "HEADER",
    "HEADER_SIZE",
    "MAX_CONFIG_SIZE",
    "MAX_PAYLOAD_SIZE",
    "U64",
    "VHOST_MEMORY_BASELINE_NREGIONS",
    "VHOST_USER_FLAG_NEED_REPLY",
    "VHOST_USER_FLAG_REPLY",
    "VHOST_USER_F_PROTOCOL_FEATURES",
    "VHOST_USER_VERSION",
    "VHOST_USER_VRING_INDEX_MASK",
    "VHOST_USER_VRING_NOFD_MASK",
    "FrontendRequest",
    "Header",
    "ProtocolFeature",
    "VhostUserConfig",
    "VhostUserInflight",
    "VhostUserMemRegMsg",
    "VhostUserMemory",
    "VhostUserMemoryRegion",
    "VhostVringAddr",
    "VhostVringState",
    "encode_message",
]

# "Communication": the virtio feature bit that announces protocol-feature negotiation.
VHOST_USER_F_PROTOCOL_FEATURES = 30

# Header flags: version in the low two bits, then the reply and need_reply bits.
VHOST_USER_VERSION = 0x1
VHOST_USER_VERSION_MASK = 0x3
VHOST_USER_FLAG_REPLY = 1 << 2
VHOST_USER_FLAG_NEED_REPLY = 1 << 3

# SET_VRING_KICK / SET_VRING_CALL / SET_VRING_ERR payload: index in bits 0-7, no-fd flag in bit 8.
VHOST_USER_VRING_INDEX_MASK = 0xFF
VHOST_USER_VRING_NOFD_MASK = 1 << 8

# QEMU's VHOST_MEMORY_BASELINE_NREGIONS: the most regions SET_MEM_TABLE may carry.
VHOST_MEMORY_BASELINE_NREGIONS = 8
# VhostUserConfig.region is 256 bytes in QEMU (VHOST_USER_MAX_CONFIG_SIZE).
MAX_CONFIG_SIZE = 256
# Largest payload any request we understand carries is SET_MEM_TABLE (8 + 8 * 32 = 264 bytes);
# anything much larger is garbage and is refused before it is buffered.
MAX_PAYLOAD_SIZE = 4096

HEADER = struct.Struct("=III")
HEADER_SIZE = HEADER.size
U64 = struct.Struct("=Q")


class FrontendRequest(enum.IntEnum):
    """``VhostUserRequest``: the requests a front-end sends ("Front-end message types")."""

    NONE = 0
    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40


class ProtocolFeature(enum.IntFlag):
    """``VHOST_USER_PROTOCOL_F_*`` as masks (the spec lists bit numbers)."""

    MQ = 1 << 0
    LOG_SHMFD = 1 << 1
    RARP = 1 << 2
    REPLY_ACK = 1 << 3
    MTU = 1 << 4
    BACKEND_REQ = 1 << 5
    CROSS_ENDIAN = 1 << 6
    CRYPTO_SESSION = 1 << 7
    PAGEFAULT = 1 << 8
    CONFIG = 1 << 9
    BACKEND_SEND_FD = 1 << 10
    HOST_NOTIFIER = 1 << 11
    INFLIGHT_SHMFD = 1 << 12
    RESET_DEVICE = 1 << 13
    INBAND_NOTIFICATIONS = 1 << 14
    CONFIGURE_MEM_SLOTS = 1 << 15
    STATUS = 1 << 16


@dataclass(frozen=True, slots=True)
class Header:
    """The 12-byte message header: request, flags, payload size."""

    request: int
    flags: int
    size: int

    @property
    def version(self) -> int:
        return self.flags & VHOST_USER_VERSION_MASK

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & VHOST_USER_FLAG_NEED_REPLY)

    @property
    def is_reply(self) -> bool:
        return bool(self.flags & VHOST_USER_FLAG_REPLY)

    def pack(self) -> bytes:
        return HEADER.pack(self.request, self.flags, self.size)

    @classmethod
    def unpack(cls, data: bytes | bytearray | memoryview) -> Header:
        return cls(*HEADER.unpack_from(data))


def encode_message(request: int, payload: bytes = b"", *, flags: int = VHOST_USER_VERSION) -> bytes:
    """Header plus payload, ready for one ``sendmsg``."""
    return HEADER.pack(request, flags, len(payload)) + payload


class _Payload:
    """Shared pack/unpack for fixed-size payloads whose fields map 1:1 onto ``STRUCT``."""

    STRUCT: ClassVar[struct.Struct]

    @classmethod
    def unpack(cls, data: bytes | bytearray | memoryview) -> Self:
        """Decode exactly ``STRUCT.size`` bytes; ``struct.error`` on any other length."""
        if len(data) != cls.STRUCT.size:
            raise struct.error(f"{cls.__name__} needs {cls.STRUCT.size} bytes, got {len(data)}")
        return cls(*cls.STRUCT.unpack(data))


@dataclass(frozen=True, slots=True)
class VhostVringState(_Payload):
    """``struct vhost_vring_state``: a ring index and a number (size, base, enable...)."""

    STRUCT: ClassVar[struct.Struct] = struct.Struct("=II")
    index: int
    num: int

    def pack(self) -> bytes:
        return self.STRUCT.pack(self.index, self.num)


@dataclass(frozen=True, slots=True)
class VhostVringAddr(_Payload):
    """``struct vhost_vring_addr``: the front-end's user addresses of the three ring areas."""

    STRUCT: ClassVar[struct.Struct] = struct.Struct("=IIQQQQ")
    index: int
    flags: int
    desc_user_addr: int
    used_user_addr: int
    avail_user_addr: int
    log_guest_addr: int

    def pack(self) -> bytes:
        return self.STRUCT.pack(
            self.index,
            self.flags,
            self.desc_user_addr,
            self.used_user_addr,
            self.avail_user_addr,
            self.log_guest_addr,
        )


@dataclass(frozen=True, slots=True)
class VhostUserMemoryRegion(_Payload):
    """``VhostUserMemoryRegion``: one region of guest memory and where its fd maps it."""

    STRUCT: ClassVar[struct.Struct] = struct.Struct("=QQQQ")
    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    mmap_offset: int

    def pack(self) -> bytes:
        return self.STRUCT.pack(
            self.guest_phys_addr, self.memory_size, self.userspace_addr, self.mmap_offset
        )


_MEMORY_HEADER = struct.Struct("=II")  # nregions, padding


@dataclass(frozen=True, slots=True)
class VhostUserMemory:
    """``VhostUserMemory`` (SET_MEM_TABLE): up to eight regions, one fd each."""

    regions: tuple[VhostUserMemoryRegion, ...]

    def pack(self) -> bytes:
        return _MEMORY_HEADER.pack(len(self.regions), 0) + b"".join(r.pack() for r in self.regions)

    @classmethod
    def unpack(cls, data: bytes | bytearray | memoryview) -> VhostUserMemory:
        """Decode; the payload may stop after the last used region or run to all eight."""
        if len(data) < _MEMORY_HEADER.size:
            raise struct.error("VhostUserMemory shorter than its header")
        nregions, _padding = _MEMORY_HEADER.unpack_from(data)
        if not 1 <= nregions <= VHOST_MEMORY_BASELINE_NREGIONS:
            raise struct.error(f"nregions {nregions} outside 1..{VHOST_MEMORY_BASELINE_NREGIONS}")
        region_size = VhostUserMemoryRegion.STRUCT.size
        needed = _MEMORY_HEADER.size + nregions * region_size
        full = _MEMORY_HEADER.size + VHOST_MEMORY_BASELINE_NREGIONS * region_size
        if not needed <= len(data) <= full:
            raise struct.error(f"VhostUserMemory of {len(data)} bytes for {nregions} regions")
        regions = tuple(
            VhostUserMemoryRegion(
                *VhostUserMemoryRegion.STRUCT.unpack_from(
                    data, _MEMORY_HEADER.size + i * region_size
                )
            )
            for i in range(nregions)
        )
        return cls(regions)


@dataclass(frozen=True, slots=True)
class VhostUserMemRegMsg(_Payload):
    """``VhostUserMemRegMsg`` (ADD_MEM_REG / REM_MEM_REG): 64-bit padding then one region."""

    STRUCT: ClassVar[struct.Struct] = struct.Struct("=QQQQQ")
    padding: int
    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    mmap_offset: int

    @property
    def region(self) -> VhostUserMemoryRegion:
        return VhostUserMemoryRegion(
            self.guest_phys_addr, self.memory_size, self.userspace_addr, self.mmap_offset
        )

    @classmethod
    def of(cls, region: VhostUserMemoryRegion) -> VhostUserMemRegMsg:
        return cls(
            0, region.guest_phys_addr, region.memory_size, region.userspace_addr, region.mmap_offset
        )

    def pack(self) -> bytes:
        return self.STRUCT.pack(
            self.padding,
            self.guest_phys_addr,
            self.memory_size,
            self.userspace_addr,
            self.mmap_offset,
        )


_CONFIG_HEADER = struct.Struct("=III")  # offset, size, flags

VHOST_SET_CONFIG_TYPE_FRONTEND = 0
VHOST_SET_CONFIG_TYPE_MIGRATION = 1


@dataclass(frozen=True, slots=True)
class VhostUserConfig:
    """``VhostUserConfig`` (GET_CONFIG / SET_CONFIG): offset, size, flags and ``size`` bytes."""

    HEADER_SIZE: ClassVar[int] = _CONFIG_HEADER.size
    offset: int
    size: int
    flags: int
    payload: bytes

    def pack(self) -> bytes:
        return _CONFIG_HEADER.pack(self.offset, self.size, self.flags) + self.payload

    @classmethod
    def unpack(cls, data: bytes | bytearray | memoryview) -> VhostUserConfig:
        """Decode; the payload must hold exactly ``size`` bytes after the header."""
        if len(data) < _CONFIG_HEADER.size:
            raise struct.error("VhostUserConfig shorter than its header")
        offset, size, flags = _CONFIG_HEADER.unpack_from(data)
        if size > MAX_CONFIG_SIZE:
            raise struct.error(f"config size {size} above {MAX_CONFIG_SIZE}")
        if len(data) != _CONFIG_HEADER.size + size:
            raise struct.error(f"VhostUserConfig of {len(data)} bytes for size {size}")
        return cls(offset, size, flags, bytes(data[_CONFIG_HEADER.size :]))


@dataclass(frozen=True, slots=True)
class VhostUserInflight:
    """``VhostUserInflight`` (GET/SET_INFLIGHT_FD): where the inflight area lives in its fd.

    QEMU's struct is not packed: two u64, two u16, then 4 bytes of tail padding (24 bytes).
    A 20-byte form (no tail padding) is accepted too.
    """

    STRUCT: ClassVar[struct.Struct] = struct.Struct("=QQHH4x")
    PACKED_SIZE: ClassVar[int] = 20
    mmap_size: int
    mmap_offset: int
    num_queues: int
    queue_size: int

    def pack(self) -> bytes:
        return self.STRUCT.pack(self.mmap_size, self.mmap_offset, self.num_queues, self.queue_size)

    @classmethod
    def unpack(cls, data: bytes | bytearray | memoryview) -> VhostUserInflight:
        if len(data) == cls.PACKED_SIZE:
            return cls(*struct.unpack("=QQHH", data))
        if len(data) != cls.STRUCT.size:
            raise struct.error(f"VhostUserInflight needs 24 bytes, got {len(data)}")
        return cls(*cls.STRUCT.unpack(data))
