"""SCSI types: opcodes, CDB fields, status, sense, LUN encoding and the Target interface.

Dependency-free and transport-independent; see `scsi_core.target` for the completion path.
"""

from scsi_core.lun import REPORT_LUNS_WLUN, decode_lun, encode_lun
from scsi_core.opcodes import Opcode
from scsi_core.sense import Asc, FieldPointer, SenseData, SenseKey, build_sense, parse_sense
from scsi_core.status import Status
from scsi_core.target import (
    BytesReader,
    BytesWriter,
    Completion,
    DataReader,
    DataWriter,
    Request,
    Response,
    Target,
    TaskAttribute,
    TaskManagementFunction,
    TmfResponse,
)

__all__ = [
    "REPORT_LUNS_WLUN",
    "Asc",
    "BytesReader",
    "BytesWriter",
    "Completion",
    "DataReader",
    "DataWriter",
    "FieldPointer",
    "Opcode",
    "Request",
    "Response",
    "SenseData",
    "SenseKey",
    "Status",
    "Target",
    "TaskAttribute",
    "TaskManagementFunction",
    "TmfResponse",
    "build_sense",
    "decode_lun",
    "encode_lun",
    "parse_sense",
]
