"""The virtio-scsi control queue: task management and asynchronous-notification requests.

Holds `ControlQueue`, which drains the controlq (virtio 1.2 section 5.6.6.2), turns
`virtio_scsi_ctrl_tmf` into `Target.task_management` calls with the spec's responses, and
answers `virtio_scsi_ctrl_an` queries and subscriptions with "no events supported". It knows
nothing about vhost-user or images; the request queues are reached only to flush completions of
aborted commands before the TMF itself completes, as 5.6.6.2 requires.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable

from scsi_core.target import Target, TaskManagementFunction, TmfResponse
from virtio_queue import DescriptorChain, InvalidChain, VirtioQueueError

from .requestq import RequestVring
from .virtio_scsi import (
    CTRL_AN_REQ,
    CTRL_AN_RESP,
    CTRL_TMF_REQ,
    CTRL_TYPE,
    ControlType,
    TmfSubtype,
    VirtioScsiResponse,
    decode_virtio_lun,
)

__all__ = ["TMF_FUNCTIONS", "TMF_RESPONSES", "ControlQueue"]

logger = logging.getLogger(__name__)

#: virtio TMF subtype -> SAM-5 function (the wire codes differ from scsi_core's numbering).
TMF_FUNCTIONS: dict[int, TaskManagementFunction] = {
    TmfSubtype.ABORT_TASK: TaskManagementFunction.ABORT_TASK,
    TmfSubtype.ABORT_TASK_SET: TaskManagementFunction.ABORT_TASK_SET,
    TmfSubtype.CLEAR_ACA: TaskManagementFunction.CLEAR_ACA,
    TmfSubtype.CLEAR_TASK_SET: TaskManagementFunction.CLEAR_TASK_SET,
    TmfSubtype.I_T_NEXUS_RESET: TaskManagementFunction.I_T_NEXUS_RESET,
    TmfSubtype.LOGICAL_UNIT_RESET: TaskManagementFunction.LOGICAL_UNIT_RESET,
    TmfSubtype.QUERY_TASK: TaskManagementFunction.QUERY_TASK,
    TmfSubtype.QUERY_TASK_SET: TaskManagementFunction.QUERY_TASK_SET,
}

#: SAM-5 service response -> virtio response byte ("map 1-to-1 with SAM", 5.6.6.2).
TMF_RESPONSES: dict[TmfResponse, VirtioScsiResponse] = {
    TmfResponse.FUNCTION_COMPLETE: VirtioScsiResponse.OK,
    TmfResponse.FUNCTION_SUCCEEDED: VirtioScsiResponse.FUNCTION_SUCCEEDED,
    TmfResponse.FUNCTION_REJECTED: VirtioScsiResponse.FUNCTION_REJECTED,
    TmfResponse.INCORRECT_LOGICAL_UNIT_NUMBER: VirtioScsiResponse.INCORRECT_LUN,
    TmfResponse.SERVICE_DELIVERY_OR_TARGET_FAILURE: VirtioScsiResponse.TARGET_FAILURE,
}


class ControlQueue:
    """Serves the controlq of one device instance.

    `flush_completions` is called after a TMF ran and before its response is published, so
    that commands it aborted are seen completed first (5.6.6.2: "Such effects MUST take place
    before the task management function itself is successfully completed").
    """

    def __init__(
        self,
        target: Target,
        flush_completions: Callable[[], None],
        *,
        nexus: Hashable = 0,
    ) -> None:
        self.target = target
        self.flush_completions = flush_completions
        self.nexus = nexus

    def process(self, vring: RequestVring, *, notify: bool = True) -> None:
        """Drain every available control request, then notify once."""
        try:
            while True:
                try:
                    chain = vring.pop()
                except InvalidChain as exc:
                    logger.warning("control queue: %s", exc)
                    vring.add_used(exc.head, 0)
                    continue
                if chain is None:
                    break
                vring.add_used(chain.head, self._handle(chain))
        except VirtioQueueError as exc:
            logger.error("control queue is broken: %s", exc)
        if notify:
            vring.notify()

    def _handle(self, chain: DescriptorChain) -> int:
        """Answer one control request; returns the used length."""
        reader = chain.reader()
        writer = chain.writer()
        if reader.remaining() < CTRL_TYPE.size:
            logger.warning("control request %d: %d bytes, no type", chain.head, chain.readable_len)
            return 0
        header = reader.read(max(CTRL_TMF_REQ.size, CTRL_AN_REQ.size))
        (ctrl_type,) = CTRL_TYPE.unpack_from(header)
        if ctrl_type == ControlType.TMF:
            if writer.remaining() < 1:
                logger.warning("TMF request %d has no room for the response", chain.head)
                return 0
            if len(header) < CTRL_TMF_REQ.size:
                logger.warning("TMF request %d is %d bytes", chain.head, len(header))
                return writer.write(bytes((VirtioScsiResponse.FAILURE,)))
            response = self._tmf(header)
            return writer.write(bytes((response,)))
        if ctrl_type in (ControlType.AN_QUERY, ControlType.AN_SUBSCRIBE):
            if writer.remaining() < CTRL_AN_RESP.size:
                logger.warning("AN request %d has no room for the response", chain.head)
                return 0
            if len(header) < CTRL_AN_REQ.size:
                return writer.write(CTRL_AN_RESP.pack(0, VirtioScsiResponse.FAILURE))
            _, lun_field, requested = CTRL_AN_REQ.unpack_from(header)
            decoded = decode_virtio_lun(lun_field)
            if decoded is None or decoded[0] != 0:
                return writer.write(CTRL_AN_RESP.pack(0, VirtioScsiResponse.BAD_TARGET))
            # We report no asynchronous events (MMC-style media events make no sense for
            # disks): event_actual is empty, and the request itself succeeded.
            logger.debug("AN type %d for events %#x: none supported", ctrl_type, requested)
            return writer.write(CTRL_AN_RESP.pack(0, VirtioScsiResponse.OK))
        logger.warning("control request %d: unknown type %d", chain.head, ctrl_type)
        return 0

    def _tmf(self, header: bytes) -> int:
        _, subtype, lun_field, tag = CTRL_TMF_REQ.unpack_from(header)
        function = TMF_FUNCTIONS.get(subtype)
        if function is None:
            logger.warning("TMF subtype %d unknown: rejected", subtype)
            return VirtioScsiResponse.FUNCTION_REJECTED
        if function == TaskManagementFunction.I_T_NEXUS_RESET:
            # 5.6.6.2: the single-level LUN is ignored for a function on the whole I_T nexus.
            if lun_field[0] != 1 or lun_field[1] != 0:
                return VirtioScsiResponse.BAD_TARGET
            lun = 0
        else:
            decoded = decode_virtio_lun(lun_field)
            if decoded is None or decoded[0] != 0:
                return VirtioScsiResponse.BAD_TARGET
            lun = decoded[1]
        try:
            result = self.target.task_management(function, lun, tag, self.nexus)
        except Exception:
            logger.exception("task management %s on LUN %d failed", function.name, lun)
            return VirtioScsiResponse.TARGET_FAILURE
        self.flush_completions()
        logger.info("TMF %s LUN %d tag %#x: %s", function.name, lun, tag, result.name)
        return TMF_RESPONSES.get(result, VirtioScsiResponse.FAILURE)
