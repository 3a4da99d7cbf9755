"""The virtio-scsi codec: layouts against the spec's sizes, LUN field, round trips."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from scsi_core.lun import REPORT_LUNS_WLUN, encode_lun
from vhost_device_scsi import virtio_scsi as vs


def test_layout_sizes_match_linux_uapi() -> None:
    # include/uapi/linux/virtio_scsi.h: cmd_req 51 bytes with a 32-byte CDB, cmd_resp 108 with
    # 96 bytes of sense, tmf req 24 / resp 1, an req 16 / resp 5, event 16, config 36.
    assert vs.CMD_REQ_HEADER.size + vs.CDB_DEFAULT_SIZE == 51
    assert vs.CMD_RESP_HEADER.size + vs.SENSE_DEFAULT_SIZE == 108
    assert vs.CTRL_TMF_REQ.size == 24
    assert vs.CTRL_TMF_RESP.size == 1
    assert vs.CTRL_AN_REQ.size == 16
    assert vs.CTRL_AN_RESP.size == 5
    assert vs.EVENT.size == 16
    assert vs.CONFIG.size == 36


def test_config_writable_field_offsets() -> None:
    cfg = vs.VirtioScsiConfig(num_queues=1, seg_max=2, max_sectors=3, cmd_per_lun=4)
    raw = cfg.pack()
    assert raw[vs.CONFIG_SENSE_SIZE_OFFSET : vs.CONFIG_SENSE_SIZE_OFFSET + 4] == (96).to_bytes(
        4, "little"
    )
    assert raw[vs.CONFIG_CDB_SIZE_OFFSET : vs.CONFIG_CDB_SIZE_OFFSET + 4] == (32).to_bytes(
        4, "little"
    )
    assert vs.VirtioScsiConfig.unpack(raw) == cfg


def test_linux_lun_encoding_decodes() -> None:
    # drivers/scsi/virtio_scsi.c virtio_scsi_init_hdr: lun[2] = (lun >> 8) | 0x40 always.
    assert vs.decode_virtio_lun(bytes((1, 0, 0x40, 5, 0, 0, 0, 0))) == (0, 5)
    assert vs.decode_virtio_lun(bytes((1, 0, 0x41, 0x2C, 0, 0, 0, 0))) == (0, 300)
    assert vs.decode_virtio_lun(bytes((1, 3, 0x7F, 0xFF, 0, 0, 0, 0))) == (3, 16383)
    # peripheral addressing, bus 0
    assert vs.decode_virtio_lun(bytes((1, 0, 0, 7, 0, 0, 0, 0))) == (0, 7)


def test_report_luns_wlun_forms() -> None:
    assert vs.decode_virtio_lun(b"\xc1\x01" + bytes(6)) == (0, REPORT_LUNS_WLUN)
    assert vs.decode_virtio_lun(bytes((1, 0, 0xC1, 0x01, 0, 0, 0, 0))) == (0, REPORT_LUNS_WLUN)


@pytest.mark.parametrize(
    "raw",
    [
        bytes(8),  # first byte not 1
        bytes((2, 0, 0, 0, 0, 0, 0, 0)),
        bytes((1, 0, 0x01, 0, 0, 0, 0, 0)),  # peripheral with bus 1
        bytes((1, 0, 0x40, 0, 0, 0, 0, 1)),  # second level present
        bytes((1, 0, 0x80, 0, 0, 0, 0, 0)),  # logical unit addressing
        bytes((0xC1, 0x02, 0, 0, 0, 0, 0, 0)),
        b"\x01\x00",  # short
    ],
)
def test_bad_lun_fields(raw: bytes) -> None:
    assert vs.decode_virtio_lun(raw) is None


@given(st.integers(0, 255), st.integers(0, 16383))
def test_lun_round_trip(target: int, lun: int) -> None:
    raw = vs.encode_virtio_lun(target, lun)
    assert vs.decode_virtio_lun(raw) == (target, lun)
    # bytes 2-3 are the REPORT LUNS encoding of the same LUN (what Linux matches events with)
    assert raw[2:4] == encode_lun(lun)[:2]


def test_encode_rejects_out_of_range() -> None:
    with pytest.raises(ValueError):
        vs.encode_virtio_lun(0, 16384)
    with pytest.raises(ValueError):
        vs.encode_virtio_lun(256, 0)


@given(
    st.binary(min_size=8, max_size=8),
    st.integers(0, 2**64 - 1),
    st.integers(0, 255),
    st.integers(0, 255),
    st.integers(0, 255),
    st.binary(max_size=32),
)
def test_cmd_req_round_trip(
    lun: bytes, tag: int, attr: int, prio: int, crn: int, cdb: bytes
) -> None:
    req = vs.CmdReq(lun, tag, attr, prio, crn, cdb.ljust(32, b"\0"))
    raw = req.pack()
    assert len(raw) == 51
    assert vs.CmdReq.unpack(raw) == req


@given(st.integers(0, 96), st.integers(0, 2**32 - 1), st.integers(0, 255), st.integers(0, 255))
def test_cmd_resp_round_trip(sense_len: int, resid: int, status: int, response: int) -> None:
    sense = bytes(range(sense_len))
    resp = vs.CmdResp(sense_len, resid, 0, status, response, sense)
    assert vs.CmdResp.unpack(resp.pack()) == resp


def test_short_messages_raise_typed_error() -> None:
    with pytest.raises(vs.VirtioScsiError):
        vs.CmdReq.unpack(bytes(50))
    with pytest.raises(vs.VirtioScsiError):
        vs.CtrlTmfReq.unpack(bytes(23))
    with pytest.raises(vs.VirtioScsiError):
        vs.CtrlAnReq.unpack(bytes(15))
    with pytest.raises(vs.VirtioScsiError):
        vs.VirtioScsiEvent.unpack(bytes(15))
    with pytest.raises(vs.VirtioScsiError):
        vs.VirtioScsiConfig.unpack(bytes(35))


@given(st.integers(0, 2**32 - 1), st.binary(min_size=8, max_size=8), st.integers(0, 2**32 - 1))
def test_event_round_trip(event: int, lun: bytes, reason: int) -> None:
    ev = vs.VirtioScsiEvent(event, lun, reason)
    assert vs.VirtioScsiEvent.unpack(ev.pack()) == ev
