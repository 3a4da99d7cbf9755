"""The virtio-scsi wire format (virtio 1.2 section 5.6): struct layouts, constants, LUN field.

Holds the byte layouts of the request, control and event queue messages and of the config
space as precompiled `struct.Struct`s, the spec's numeric constants, and small dataclasses named
after the spec's structs for the non-hot paths. It knows nothing about queues, guest memory,
SCSI command semantics or vhost-user: it only turns bytes into values and back.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from scsi_core.lun import REPORT_LUNS_WLUN

__all__ = [
    "CDB_DEFAULT_SIZE",
    "CMD_REQ_HEADER",
    "CMD_RESP_HEADER",
    "CONFIG",
    "CONFIG_CDB_SIZE_OFFSET",
    "CONFIG_SENSE_SIZE_OFFSET",
    "CTRL_AN_REQ",
    "CTRL_AN_RESP",
    "CTRL_TMF_REQ",
    "CTRL_TMF_RESP",
    "CTRL_TYPE",
    "EVENT",
    "REPORT_LUNS_WLUN",
    "SENSE_DEFAULT_SIZE",
    "VIRTIO_ID_SCSI",
    "VIRTIO_SCSI_F_CHANGE",
    "VIRTIO_SCSI_F_HOTPLUG",
    "VIRTIO_SCSI_F_INOUT",
    "VIRTIO_SCSI_F_T10_PI",
    "VIRTIO_SCSI_T_EVENTS_MISSED",
    "CmdReq",
    "CmdResp",
    "ControlType",
    "CtrlAnReq",
    "CtrlAnResp",
    "CtrlTmfReq",
    "EventType",
    "ResetReason",
    "TaskAttr",
    "TmfSubtype",
    "VirtioScsiConfig",
    "VirtioScsiError",
    "VirtioScsiEvent",
    "VirtioScsiResponse",
    "decode_virtio_lun",
    "encode_virtio_lun",
]

#: Device ID of a SCSI host (virtio 1.2 section 5.6.1).
VIRTIO_ID_SCSI = 8

# Feature bits (5.6.3).
VIRTIO_SCSI_F_INOUT = 0
VIRTIO_SCSI_F_HOTPLUG = 1
VIRTIO_SCSI_F_CHANGE = 2
VIRTIO_SCSI_F_T10_PI = 3

#: Defaults the device MUST put in config space at reset (5.6.4.1).
CDB_DEFAULT_SIZE = 32
SENSE_DEFAULT_SIZE = 96


#: Bit 31 of `virtio_scsi_event.event`: events were lost for lack of buffers (5.6.6.3).
VIRTIO_SCSI_T_EVENTS_MISSED = 0x80000000


class VirtioScsiError(Exception):
    """A virtio-scsi message could not be decoded (too short, bad field)."""


class VirtioScsiResponse(enum.IntEnum):
    """The `response` byte of command and control responses (5.6.6.1, 5.6.6.2)."""

    OK = 0  # also FUNCTION_COMPLETE for TMFs
    OVERRUN = 1
    ABORTED = 2
    BAD_TARGET = 3
    RESET = 4
    BUSY = 5
    TRANSPORT_FAILURE = 6
    TARGET_FAILURE = 7
    NEXUS_FAILURE = 8
    FAILURE = 9
    FUNCTION_SUCCEEDED = 10
    FUNCTION_REJECTED = 11
    INCORRECT_LUN = 12


class TaskAttr(enum.IntEnum):
    """`task_attr` of a command request (5.6.6.1)."""

    SIMPLE = 0
    ORDERED = 1
    HEAD = 2
    ACA = 3


class ControlType(enum.IntEnum):
    """`type` of a controlq request (5.6.6.2)."""

    TMF = 0
    AN_QUERY = 1
    AN_SUBSCRIBE = 2


class TmfSubtype(enum.IntEnum):
    """`subtype` of a task management request (5.6.6.2)."""

    ABORT_TASK = 0
    ABORT_TASK_SET = 1
    CLEAR_ACA = 2
    CLEAR_TASK_SET = 3
    I_T_NEXUS_RESET = 4
    LOGICAL_UNIT_RESET = 5
    QUERY_TASK = 6
    QUERY_TASK_SET = 7


class EventType(enum.IntEnum):
    """`event` of an eventq element, without the EVENTS_MISSED bit (5.6.6.3)."""

    NO_EVENT = 0
    TRANSPORT_RESET = 1
    ASYNC_NOTIFY = 2
    PARAM_CHANGE = 3


class ResetReason(enum.IntEnum):
    """`reason` of a VIRTIO_SCSI_T_TRANSPORT_RESET event (5.6.6.3)."""

    HARD = 0
    RESCAN = 1
    REMOVED = 2


# --- layouts (all little-endian: virtio 1.x, no legacy interface) ------------------------------

#: struct virtio_scsi_req_cmd, device-readable part up to the CDB: lun[8], id, task_attr, prio,
#: crn. The CDB (`cdb_size` bytes from config space) follows.
CMD_REQ_HEADER = struct.Struct("<8sQBBB")
#: struct virtio_scsi_req_cmd, device-writable part up to the sense: sense_len, residual,
#: status_qualifier, status, response. `sense_size` bytes of sense follow, then data-in.
CMD_RESP_HEADER = struct.Struct("<IIHBB")
#: The `type` field every controlq request starts with.
CTRL_TYPE = struct.Struct("<I")
#: struct virtio_scsi_ctrl_tmf, device-readable part: type, subtype, lun[8], id.
CTRL_TMF_REQ = struct.Struct("<II8sQ")
#: struct virtio_scsi_ctrl_tmf, device-writable part: response.
CTRL_TMF_RESP = struct.Struct("<B")
#: struct virtio_scsi_ctrl_an, device-readable part: type, lun[8], event_requested.
CTRL_AN_REQ = struct.Struct("<I8sI")
#: struct virtio_scsi_ctrl_an, device-writable part: event_actual, response.
CTRL_AN_RESP = struct.Struct("<IB")
#: struct virtio_scsi_event: event, lun[8], reason.
EVENT = struct.Struct("<I8sI")
#: struct virtio_scsi_config (5.6.4).
CONFIG = struct.Struct("<IIIIIIIHHI")


# --- the LUN field ----------------------------------------------------------------------------

_ZERO4 = bytes(4)


def decode_virtio_lun(lun: bytes) -> tuple[int, int] | None:
    """Decode the 8-byte virtio `lun` field into (target, SAM LUN number), or None.

    5.6.6.1: the field is 1, target, a single-level LUN structure in bytes 2-3, four zero bytes;
    or 0xC1 0x01 + six zeros for the REPORT LUNS well-known LU. Bytes 2-3 may use peripheral
    (00b, bus 0) or flat-space (01b) addressing (Linux always sends flat space, QEMU's REPORT
    LUNS uses peripheral below 256), or name the REPORT LUNS W-LUN. Anything else is None:
    the transport answers such a request with VIRTIO_SCSI_S_BAD_TARGET.
    """
    if len(lun) != 8:
        return None
    b0 = lun[0]
    if b0 == 0xC1:
        if lun[1] == 0x01 and lun[2:8] == bytes(6):
            return 0, REPORT_LUNS_WLUN
        return None
    if b0 != 1 or lun[4:8] != _ZERO4:
        return None
    b2 = lun[2]
    method = b2 >> 6
    if method == 1:  # flat space: 14-bit LUN
        return lun[1], ((b2 & 0x3F) << 8) | lun[3]
    if method == 0:  # peripheral device: bus identifier must be 0
        return (lun[1], lun[3]) if b2 == 0 else None
    if b2 == 0xC1 and lun[3] == 0x01:  # W-LUN in the single-level structure
        return lun[1], REPORT_LUNS_WLUN
    return None


def encode_virtio_lun(target: int, lun: int) -> bytes:
    """The 8-byte virtio `lun` field for (target, LUN), as events and drivers use it.

    LUNs below 256 use peripheral addressing and larger ones flat space, i.e. the encoding of
    REPORT LUNS: Linux reads bytes 2-3 of an event's LUN as the same integer it derived from
    REPORT LUNS (drivers/scsi/virtio_scsi.c, virtscsi_handle_transport_reset).
    """
    if not 0 <= target <= 255 or not 0 <= lun <= 0x3FFF:
        raise ValueError(f"cannot encode target {target} LUN {lun} in the virtio LUN field")
    if lun < 256:
        return bytes((1, target, 0, lun, 0, 0, 0, 0))
    return bytes((1, target, 0x40 | (lun >> 8), lun & 0xFF, 0, 0, 0, 0))


# --- dataclasses for the non-hot paths ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CmdReq:
    """struct virtio_scsi_req_cmd, device-readable header (without T10 PI fields)."""

    lun: bytes
    tag: int
    task_attr: int
    prio: int
    crn: int
    cdb: bytes

    @classmethod
    def unpack(cls, data: bytes, cdb_size: int = CDB_DEFAULT_SIZE) -> CmdReq:
        """Decode a header of `CMD_REQ_HEADER.size + cdb_size` bytes."""
        size = CMD_REQ_HEADER.size + cdb_size
        if len(data) < size:
            raise VirtioScsiError(f"command request header is {len(data)} bytes, need {size}")
        lun, tag, attr, prio, crn = CMD_REQ_HEADER.unpack_from(data)
        return cls(lun, tag, attr, prio, crn, bytes(data[CMD_REQ_HEADER.size : size]))

    def pack(self, cdb_size: int = CDB_DEFAULT_SIZE) -> bytes:
        """Encode, padding or truncating the CDB to `cdb_size` bytes."""
        cdb = self.cdb[:cdb_size].ljust(cdb_size, b"\0")
        head = CMD_REQ_HEADER.pack(self.lun, self.tag, self.task_attr, self.prio, self.crn)
        return head + cdb


@dataclass(frozen=True, slots=True)
class CmdResp:
    """struct virtio_scsi_req_cmd, device-writable header (sense included)."""

    sense_len: int
    residual: int
    status_qualifier: int
    status: int
    response: int
    sense: bytes

    @classmethod
    def unpack(cls, data: bytes, sense_size: int = SENSE_DEFAULT_SIZE) -> CmdResp:
        """Decode a response header; `sense` holds the first `sense_len` sense bytes."""
        size = CMD_RESP_HEADER.size + sense_size
        if len(data) < size:
            raise VirtioScsiError(f"command response is {len(data)} bytes, need {size}")
        sense_len, residual, qualifier, status, response = CMD_RESP_HEADER.unpack_from(data)
        start = CMD_RESP_HEADER.size
        sense = bytes(data[start : start + min(sense_len, sense_size)])
        return cls(sense_len, residual, qualifier, status, response, sense)

    def pack(self, sense_size: int = SENSE_DEFAULT_SIZE) -> bytes:
        """Encode with the sense zero-padded to `sense_size`."""
        head = CMD_RESP_HEADER.pack(
            self.sense_len, self.residual, self.status_qualifier, self.status, self.response
        )
        return head + self.sense[:sense_size].ljust(sense_size, b"\0")


@dataclass(frozen=True, slots=True)
class CtrlTmfReq:
    """struct virtio_scsi_ctrl_tmf, device-readable part."""

    type: int
    subtype: int
    lun: bytes
    tag: int

    @classmethod
    def unpack(cls, data: bytes) -> CtrlTmfReq:
        """Decode; raises VirtioScsiError when too short."""
        if len(data) < CTRL_TMF_REQ.size:
            raise VirtioScsiError(f"TMF request is {len(data)} bytes, need {CTRL_TMF_REQ.size}")
        return cls(*CTRL_TMF_REQ.unpack_from(data))

    def pack(self) -> bytes:
        """Encode."""
        return CTRL_TMF_REQ.pack(self.type, self.subtype, self.lun, self.tag)


@dataclass(frozen=True, slots=True)
class CtrlAnReq:
    """struct virtio_scsi_ctrl_an, device-readable part."""

    type: int
    lun: bytes
    event_requested: int

    @classmethod
    def unpack(cls, data: bytes) -> CtrlAnReq:
        """Decode; raises VirtioScsiError when too short."""
        if len(data) < CTRL_AN_REQ.size:
            raise VirtioScsiError(f"AN request is {len(data)} bytes, need {CTRL_AN_REQ.size}")
        return cls(*CTRL_AN_REQ.unpack_from(data))

    def pack(self) -> bytes:
        """Encode."""
        return CTRL_AN_REQ.pack(self.type, self.lun, self.event_requested)


@dataclass(frozen=True, slots=True)
class CtrlAnResp:
    """struct virtio_scsi_ctrl_an, device-writable part."""

    event_actual: int
    response: int

    @classmethod
    def unpack(cls, data: bytes) -> CtrlAnResp:
        """Decode; raises VirtioScsiError when too short."""
        if len(data) < CTRL_AN_RESP.size:
            raise VirtioScsiError(f"AN response is {len(data)} bytes, need {CTRL_AN_RESP.size}")
        return cls(*CTRL_AN_RESP.unpack_from(data))

    def pack(self) -> bytes:
        """Encode."""
        return CTRL_AN_RESP.pack(self.event_actual, self.response)


@dataclass(frozen=True, slots=True)
class VirtioScsiEvent:
    """struct virtio_scsi_event."""

    event: int
    lun: bytes
    reason: int

    @classmethod
    def unpack(cls, data: bytes) -> VirtioScsiEvent:
        """Decode; raises VirtioScsiError when too short."""
        if len(data) < EVENT.size:
            raise VirtioScsiError(f"event is {len(data)} bytes, need {EVENT.size}")
        return cls(*EVENT.unpack_from(data))

    def pack(self) -> bytes:
        """Encode."""
        return EVENT.pack(self.event, self.lun, self.reason)


@dataclass(slots=True)
class VirtioScsiConfig:
    """struct virtio_scsi_config (5.6.4); `sense_size` and `cdb_size` are driver-writable."""

    num_queues: int
    seg_max: int
    max_sectors: int
    cmd_per_lun: int
    event_info_size: int = EVENT.size
    sense_size: int = SENSE_DEFAULT_SIZE
    cdb_size: int = CDB_DEFAULT_SIZE
    max_channel: int = 0
    max_target: int = 0
    max_lun: int = 16383

    def pack(self) -> bytes:
        """Encode the whole config space."""
        return CONFIG.pack(
            self.num_queues,
            self.seg_max,
            self.max_sectors,
            self.cmd_per_lun,
            self.event_info_size,
            self.sense_size,
            self.cdb_size,
            self.max_channel,
            self.max_target,
            self.max_lun,
        )

    @classmethod
    def unpack(cls, data: bytes) -> VirtioScsiConfig:
        """Decode a whole config space."""
        if len(data) < CONFIG.size:
            raise VirtioScsiError(f"config space is {len(data)} bytes, need {CONFIG.size}")
        return cls(*CONFIG.unpack_from(data))


#: Byte offsets of the two driver-writable config fields (5.6.4: the driver MUST NOT write others).
CONFIG_SENSE_SIZE_OFFSET = 20
CONFIG_CDB_SIZE_OFFSET = 24
