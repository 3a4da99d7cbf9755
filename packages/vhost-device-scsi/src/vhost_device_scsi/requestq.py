"""The virtio-scsi request queues: the hot path from a descriptor chain to a SCSI Target and back.

Holds `RequestQueues`, which drains a request virtqueue (virtio 1.2 section 5.6.6.1), decodes
each `virtio_scsi_req_cmd`, hands a `scsi_core.target.Request` whose data buffers are the
chain's own guest-memory buffers to the Target, and writes the response header and used element.
Commands the Target leaves pending are finished later from a `CompletionChannel`. It knows
nothing about vhost-user messages, sockets or images; it sees queues only through the small
`RequestVring` protocol below (what vhost_user.Vring provides).

Every chain popped is completed exactly once, whatever it holds: a short header or a response
buffer too small gets VIRTIO_SCSI_S_FAILURE (or used length 0 when not even the fixed response
fields fit), an unknown target BAD_TARGET; a chain the queue layer rejects gets used length 0.

Per command the hot path allocates only what the contract needs (the chain's buffers, one
reader or writer, one `Request`): the `complete` callback is one reused `PendingCommand` until
a target keeps it, and the header, CDB and response fields move with one struct call each.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable, Hashable
from typing import Protocol

from scsi_core.status import Status
from scsi_core.target import DataWriter, Request, Response, Target, TaskAttribute
from virtio_queue import DescriptorChain
from virtio_queue.errors import InvalidChain, VirtioQueueError

from .completions import CompletionChannel
from .virtio_scsi import (
    CDB_DEFAULT_SIZE,
    CMD_REQ_HEADER,
    CMD_RESP_HEADER,
    SENSE_DEFAULT_SIZE,
    VirtioScsiResponse,
    decode_virtio_lun,
)

__all__ = ["PendingCommand", "RequestQueues", "RequestVring"]

logger = logging.getLogger(__name__)

_OK = int(VirtioScsiResponse.OK)
_ABORTED = int(VirtioScsiResponse.ABORTED)
_BAD_TARGET = int(VirtioScsiResponse.BAD_TARGET)
_FAILURE = int(VirtioScsiResponse.FAILURE)
_TASK_ABORTED = int(Status.TASK_ABORTED)
_CMD_HDR = CMD_REQ_HEADER.size
_RESP_HDR = CMD_RESP_HEADER.size
_pack_resp_into = CMD_RESP_HEADER.pack_into
_unpack_req = CMD_REQ_HEADER.unpack_from
# virtio's task_attr values are SAM's as scsi_core numbers them; anything else maps to SIMPLE,
# which 5.6.6.1 allows for every attribute.
_ATTRS = tuple(
    TaskAttribute(a) if a <= TaskAttribute.ACA else TaskAttribute.SIMPLE for a in range(256)
)
#: Don't let a guest grow the LUN-field cache without bound with junk fields.
_LUN_CACHE_MAX = 4096

_RequestFields = tuple[bytes, int, int, int, int, bytes]


def _request_unpacker(cdb_size: int) -> Callable[[memoryview], _RequestFields]:
    """`virtio_scsi_req_cmd` with its CDB as one struct: the CDB comes out as a bytes copy."""
    fmt = CMD_REQ_HEADER.format + f"{cdb_size}s"
    unpack: Callable[[memoryview], _RequestFields] = struct.Struct(fmt).unpack_from
    return unpack


class RequestVring(Protocol):
    """What the request path needs of a vring (vhost_user.Vring satisfies it)."""

    @property
    def index(self) -> int: ...

    def pop(self) -> DescriptorChain | None: ...

    def add_used(self, head: int, length: int) -> None: ...

    def notify(self) -> None: ...


class PendingCommand:
    """Where a command's response goes; it is also the command's `complete` callback.

    Calling it (from any thread) posts it to the completion channel; `RequestQueues.finish`
    then writes the response on the queue's thread. One instance is handed to command after
    command while the target completes them inline (it never calls `complete` then), and its
    fields are filled in only when a target leaves a command pending: `finish` runs on the
    queue's thread, so never before `_handle` has filled them, even if a worker thread calls
    `complete` before `execute` has returned.
    """

    __slots__ = ("channel", "generation", "head", "resp_buf", "vring", "writable", "writer")

    def __init__(self, channel: CompletionChannel[PendingCommand, Response]) -> None:
        self.channel = channel
        self.vring: RequestVring | None = None
        self.generation = 0
        self.head = 0
        #: The device-writable buffer holding the whole response header and sense, or None
        #: when they are scattered over the first buffers of `writable`.
        self.resp_buf: memoryview | None = None
        self.writable: list[memoryview] = []
        #: The data-in writer, positioned after the response header; None without data-in.
        self.writer: DataWriter | None = None

    def __call__(self, response: Response) -> None:
        self.channel.post(self, response)


class RequestQueues:
    """Serves every request queue of one device instance (one front-end connection).

    `process(vring)` is called from the queue's kick handler; it drains every available chain
    and notifies the driver once for the batch. All methods run on the thread that owns the
    queues; only `PendingCommand.__call__` may run elsewhere.
    """

    def __init__(
        self,
        target: Target,
        channel: CompletionChannel[PendingCommand, Response],
        *,
        nexus: Hashable = 0,
    ) -> None:
        self.target = target
        self.channel = channel
        self.nexus = nexus
        #: VIRTIO_SCSI_F_INOUT negotiated: bidirectional commands allowed (5.6.6.1).
        self.inout = True
        self._cdb_size = CDB_DEFAULT_SIZE
        self._sense_size = SENSE_DEFAULT_SIZE
        self._req_size = _CMD_HDR + CDB_DEFAULT_SIZE
        self._resp_size = _RESP_HDR + SENSE_DEFAULT_SIZE
        self._lun_cache: dict[bytes, int] = {}
        self._unpack_req_cdb = _request_unpacker(CDB_DEFAULT_SIZE)
        self._spare: PendingCommand | None = None
        # Bumped per queue start so that late completions for a ring that has since been
        # stopped (device reset, disconnect) are dropped instead of touching a new ring.
        self._generation: dict[int, int] = {}
        self._live: dict[int, RequestVring] = {}
        #: Commands the target left pending and `finish` has not completed yet (all queues):
        #: how busy the device is, for the daemon's busy polling.
        self.outstanding = 0
        self._peak = 0  # the most outstanding after a batch since `take_peak`

    # -- configuration ---------------------------------------------------------------------

    def set_sizes(self, cdb_size: int, sense_size: int) -> None:
        """Apply the config-space `cdb_size` and `sense_size` (driver-writable, 5.6.4)."""
        self._cdb_size = cdb_size
        self._sense_size = sense_size
        self._req_size = _CMD_HDR + cdb_size
        self._resp_size = _RESP_HDR + sense_size
        self._unpack_req_cdb = _request_unpacker(cdb_size)

    def start(self, vring: RequestVring) -> None:
        """A request queue became live."""
        index = vring.index
        self._generation[index] = self._generation.get(index, 0) + 1
        self._live[index] = vring

    def stop(self, index: int) -> None:
        """A request queue stopped: its pending commands' completions will be dropped."""
        self._live.pop(index, None)
        self._generation[index] = self._generation.get(index, 0) + 1

    # -- the hot path ----------------------------------------------------------------------

    def process(self, vring: RequestVring, *, notify: bool = True) -> None:
        """Drain every available chain of `vring`, then notify the driver once.

        The queue layer re-arms the kick before it reports the ring empty (virtio 1.2 2.7.10),
        so draining until `pop` returns None cannot miss a buffer. Pass `notify=False` when the
        caller notifies itself (vhost_user does after `handle_kick`).

        Cost model: everything per command is paid ~200k times a second, so the common layout
        is served inline here (one unpack for the header and CDB, a reader/writer positioned
        past the headers, one `Request`, one pack for the response) and every other layout
        goes to `_handle`. `packages/vhost-device-scsi/tests/bench_request_path.py` measures it.
        """
        pop = vring.pop
        add_used = vring.add_used
        handle = self._handle
        generation = self._generation.get(vring.index, 0)
        # Everything the loop reads per command, hoisted: nothing here changes while a batch
        # runs (configuration arrives as vhost-user messages, between batches).
        execute = self.target.execute
        unpack = self._unpack_req_cdb
        lun_cache = self._lun_cache
        req_size = self._req_size
        resp_size = self._resp_size
        nexus = self.nexus
        inout = self.inout
        pending = self._spare
        if pending is None:
            pending = PendingCommand(self.channel)
        target = self.target
        # A remote back-end may hold a batch's requests back and send them together
        # (begin/end_batch). The batch opens at its second chain: the first request goes out
        # at once, so a lone one (queue depth 1) pays no holding back, and a deep queue's
        # first request is on the wire while the rest are decoded.
        first = True
        batching = False
        try:
            while True:
                try:
                    chain = pop()
                except InvalidChain as exc:
                    logger.warning("request queue %d: %s", vring.index, exc)
                    vring.add_used(exc.head, 0)
                    continue
                if chain is None:
                    break
                if first:
                    first = False
                elif not batching:
                    batching = True
                    target.begin_batch()
                # The fast path, inline because it is paid per command: the header in one
                # device-readable buffer, the response fields in one device-writable buffer,
                # a LUN seen before. Anything else goes to `_handle`, the general path, which
                # gives every command the same answer this would.
                rlen = chain.readable_len
                wlen = chain.writable_len
                if rlen < req_size or wlen < resp_size:
                    pending = handle(vring, generation, chain, pending)
                    continue
                b0 = chain.readable[0]
                writable = chain.writable
                resp = writable[0]
                if len(b0) < req_size or len(resp) < resp_size:
                    pending = handle(vring, generation, chain, pending)
                    continue
                # One unpack copies the fields and the CDB out of guest memory: later guest
                # writes cannot change what we validated.
                lun_field, tag, attr, prio, crn, cdb = unpack(b0)
                lun = lun_cache.get(lun_field)
                if lun is None:  # first sight of this LUN field (or not a LUN): decode it there
                    pending = handle(vring, generation, chain, pending)
                    continue
                data_out = chain.reader(req_size) if rlen > req_size else None
                data_in = chain.writer(resp_size) if wlen > resp_size else None
                if data_out is not None and data_in is not None and not inout:
                    pending = handle(vring, generation, chain, pending)  # refused (5.6.6.1)
                    continue
                request = Request(lun, cdb, data_out, data_in, tag, _ATTRS[attr], prio, crn, nexus)
                response = execute(request, pending)
                if response is None:
                    # Pending: the target holds `pending` until it calls it; `finish` reads
                    # these fields later, on this thread.
                    pending.vring = vring
                    pending.generation = generation
                    pending.head = chain.head
                    pending.resp_buf = resp
                    pending.writable = writable
                    pending.writer = data_in
                    pending = PendingCommand(self.channel)
                    self.outstanding += 1
                    continue
                status = response.status
                if response.sense or status == _TASK_ABORTED:
                    self._write_response(
                        resp,
                        writable,
                        _ABORTED if status == _TASK_ABORTED else _OK,
                        status,
                        response.sense,
                        response.residual,
                    )
                else:
                    _pack_resp_into(resp, 0, 0, response.residual, 0, status, _OK)
                add_used(chain.head, resp_size if data_in is None else data_in.written)
        except VirtioQueueError as exc:
            # A broken ring (not one bad chain): nothing more can be popped from it.
            logger.error("request queue %d is broken: %s", vring.index, exc)
        finally:
            self._spare = pending
            if batching:
                target.end_batch()
            if self.outstanding > self._peak:
                self._peak = self.outstanding
        if notify:
            vring.notify()

    def take_peak(self) -> int:
        """The most commands outstanding at once since the last call (at least those now): a
        queue that drains in bursts reads busy even between them."""
        now = self.outstanding
        peak = max(self._peak, now)
        self._peak = now
        return peak

    def _handle(
        self,
        vring: RequestVring,
        generation: int,
        chain: DescriptorChain,
        pending: PendingCommand,
    ) -> PendingCommand:
        """Serve one command, whatever its layout; returns the spare `PendingCommand` to use
        next (`pending` itself unless the target kept it)."""
        resp_size = self._resp_size
        req_size = self._req_size
        wlen = chain.writable_len
        rlen = chain.readable_len
        if wlen < resp_size or rlen < req_size:
            why = "no room for the response" if wlen < resp_size else "request header too short"
            self._malformed(vring, chain, why)
            return pending
        # The header is unpacked straight from guest memory when one descriptor holds it (the
        # Linux layout): the fields become Python values at once, the CDB is copied, so later
        # guest writes cannot change what we validated.
        b0 = chain.readable[0]
        if len(b0) >= req_size:
            lun_field, tag, attr, prio, crn, cdb = self._unpack_req_cdb(b0)
            data_out = chain.reader(req_size) if rlen > req_size else None
        else:
            reader = chain.reader()
            hdr = reader.read(req_size)
            lun_field, tag, attr, prio, crn = _unpack_req(hdr)
            cdb = hdr[_CMD_HDR:]
            data_out = reader if reader.remaining() else None
        writable = chain.writable
        resp: memoryview | None = writable[0]
        if len(writable[0]) < resp_size:
            resp = None  # the response header is scattered over several descriptors
        data_in = chain.writer(resp_size) if wlen > resp_size else None
        head = chain.head
        lun = self._lun_cache.get(lun_field)
        if lun is None:
            decoded = decode_virtio_lun(lun_field)
            if decoded is None or decoded[0] != 0:
                # 5.6.6.1: "the target indicated by lun does not exist".
                self._write_response(resp, writable, _BAD_TARGET, 0, b"", 0)
                vring.add_used(head, resp_size if data_in is None else data_in.written)
                return pending
            lun = decoded[1]
            if len(self._lun_cache) < _LUN_CACHE_MAX:
                self._lun_cache[lun_field] = lun
        if data_out is not None and data_in is not None and not self.inout:
            # 5.6.6.1: both directions without VIRTIO_SCSI_F_INOUT is answered FAILURE.
            self._write_response(resp, writable, _FAILURE, 0, b"", 0)
            vring.add_used(head, data_in.written)
            return pending
        request = Request(lun, cdb, data_out, data_in, tag, _ATTRS[attr], prio, crn, self.nexus)
        response = self.target.execute(request, pending)
        if response is None:
            # Pending: the target holds `pending` until it calls it.
            pending.vring = vring
            pending.generation = generation
            pending.head = head
            pending.resp_buf = resp
            pending.writable = writable
            pending.writer = data_in
            self.outstanding += 1
            return PendingCommand(self.channel)
        status = response.status
        if resp is not None and not response.sense and status != _TASK_ABORTED:
            # The common answer: the fixed fields in one buffer, no sense to copy.
            _pack_resp_into(resp, 0, 0, response.residual, 0, status, _OK)
        else:
            self._write_response(
                resp,
                writable,
                _ABORTED if status == _TASK_ABORTED else _OK,
                status,
                response.sense,
                response.residual,
            )
        vring.add_used(head, resp_size if data_in is None else data_in.written)
        return pending

    def _write_response(
        self,
        resp: memoryview | None,
        writable: list[memoryview],
        vresponse: int,
        status: int,
        sense: bytes,
        residual: int,
    ) -> None:
        """Write the virtio_scsi_cmd_resp header and sense (into `resp`, else scattered)."""
        sense_len = len(sense)
        if sense_len > self._sense_size:
            sense_len = self._sense_size
            sense = sense[:sense_len]
        if resp is not None:
            _pack_resp_into(resp, 0, sense_len, residual, 0, status, vresponse)
            if sense_len:
                resp[_RESP_HDR : _RESP_HDR + sense_len] = sense
            return
        data = CMD_RESP_HEADER.pack(sense_len, residual, 0, status, vresponse) + sense
        pos = 0
        for buf in writable:
            chunk = data[pos : pos + len(buf)]
            buf[: len(chunk)] = chunk
            pos += len(chunk)
            if pos >= len(data):
                break

    def _malformed(self, vring: RequestVring, chain: DescriptorChain, why: str) -> None:
        """Complete a chain that cannot carry a command: FAILURE if the fixed fields fit."""
        logger.warning("request queue %d, chain %d: %s", vring.index, chain.head, why)
        writer = chain.writer()
        if writer.remaining() >= _RESP_HDR:
            writer.write(CMD_RESP_HEADER.pack(0, 0, 0, 0, _FAILURE))
        vring.add_used(chain.head, writer.written)

    # -- late completions ------------------------------------------------------------------

    def finish(self, pending: PendingCommand, response: Response) -> RequestVring | None:
        """Complete a command the target left pending; returns the vring to notify, if any."""
        self.outstanding -= 1
        vring = pending.vring
        if vring is None:
            return None
        index = vring.index
        if self._live.get(index) is not vring or self._generation.get(index) != pending.generation:
            logger.debug("completion for stopped queue %d dropped (head %d)", index, pending.head)
            return None
        status = response.status
        resp = pending.resp_buf
        if resp is not None and not response.sense and status != _TASK_ABORTED:
            # The common answer, as in `process`: the fixed fields in one buffer, no sense.
            _pack_resp_into(resp, 0, 0, response.residual, 0, status, _OK)
        else:
            self._write_response(
                resp,
                pending.writable,
                _ABORTED if status == _TASK_ABORTED else _OK,
                status,
                response.sense,
                response.residual,
            )
        writer = pending.writer
        vring.add_used(pending.head, self._resp_size if writer is None else writer.written)
        return vring

    def finish_all(self) -> None:
        """Finish every completion posted so far and notify each touched queue once."""
        touched: list[RequestVring] = []
        for pending, response in self.channel.drain():
            try:
                vring = self.finish(pending, response)
            except VirtioQueueError as exc:
                logger.error("cannot complete head %d: %s", pending.head, exc)
                continue
            if vring is not None and vring not in touched:
                touched.append(vring)
        for vring in touched:
            vring.notify()
