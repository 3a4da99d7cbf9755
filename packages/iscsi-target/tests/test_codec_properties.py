"""Property tests: PDU round trips, framing of random streams, CRC32C, text codec."""

from __future__ import annotations

import contextlib
from dataclasses import fields

from hypothesis import given
from hypothesis import strategies as st
from iscsi_target.constants import BHS_LENGTH
from iscsi_target.crc32c import crc32c, digest_bytes
from iscsi_target.framing import FramingError, PduReader, frame_pdu
from iscsi_target.pdu import (
    R2T,
    AsyncMessage,
    DataIn,
    DataOut,
    LoginRequest,
    LoginResponse,
    LogoutRequest,
    LogoutResponse,
    NopIn,
    NopOut,
    Pdu,
    PduError,
    Reject,
    ScsiCommand,
    ScsiResponse,
    SnackRequest,
    TaskManagementRequest,
    TaskManagementResponse,
    TextRequest,
    TextResponse,
    decode_pdu,
)
from iscsi_target.text import TextError, decode_text, encode_text

u32 = st.integers(0, 0xFFFFFFFF)
u16 = st.integers(0, 0xFFFF)
u8 = st.integers(0, 0xFF)
lun = st.binary(min_size=8, max_size=8)
data = st.binary(max_size=300)
two_bits = st.sampled_from([0, 1, 3])

PDUS: st.SearchStrategy[Pdu] = st.one_of(
    st.builds(NopOut, u32, u32, u32, u32, lun, st.booleans(), data),
    st.builds(
        ScsiCommand,
        itt=u32,
        cdb=st.binary(min_size=16, max_size=40),
        expected_data_transfer_length=u32,
        cmdsn=u32,
        exp_statsn=u32,
        lun=lun,
        final=st.booleans(),
        read=st.booleans(),
        write=st.booleans(),
        attribute=st.integers(0, 7),
        immediate=st.booleans(),
        bidirectional_read_length=st.none() | u32,
        data=data,
    ),
    st.builds(TaskManagementRequest, u32, st.integers(0, 127), u32, u32, u32, u32, u32, lun,
              st.booleans()),
    st.builds(LoginRequest, u32, st.integers(0, (1 << 48) - 1), two_bits, two_bits,
              st.booleans(), st.booleans(), u16, u16, u32, u32, u8, u8, data),
    st.builds(TextRequest, u32, u32, u32, u32, lun, st.booleans(), st.booleans(), st.booleans(),
              data),
    st.builds(DataOut, u32, u32, u32, u32, u32, lun, st.booleans(), data),
    st.builds(LogoutRequest, u32, st.integers(0, 127), u16, u32, u32, st.booleans()),
    st.builds(SnackRequest, u32, st.integers(0, 15), u32, u32, u32, u32, lun),
    st.builds(NopIn, u32, u32, u32, u32, u32, lun, data),
    st.builds(ScsiResponse, u32, u8, u8, st.sampled_from([0, 2, 4, 8, 16, 18]), u32, u32, u32,
              u32, u32, u32, u32, data),
    st.builds(TaskManagementResponse, u32, u8, u32, u32, u32),
    st.builds(LoginResponse, u32, st.integers(0, (1 << 48) - 1), two_bits, two_bits,
              st.booleans(), st.booleans(), u16, u32, u32, u32, u16, u8, u8, data),
    st.builds(TextResponse, u32, u32, u32, u32, u32, lun, st.booleans(), st.booleans(), data),
    st.builds(DataIn, u32, u32, u32, st.booleans(), st.just(True), u8, st.sampled_from([0, 2, 4]),
              u32, u32, u32, u32, u32, lun, data),
    st.builds(R2T, u32, u32, u32, u32, u32, u32, u32, u32, lun),
    st.builds(AsyncMessage, u8, u8, u16, u16, u16, u32, u32, u32, lun, data),
    st.builds(LogoutResponse, u32, u8, u32, u32, u32, u16, u16),
    st.builds(Reject, u8, u32, u32, u32, u32, data),
)  # fmt: skip


def _as_tuple(pdu: Pdu) -> tuple[object, ...]:
    return tuple(bytes(v) if isinstance(v, memoryview) else v for v in
                 (getattr(pdu, f.name) for f in fields(pdu)))  # fmt: skip


@given(PDUS, st.booleans(), st.booleans())
def test_every_pdu_round_trips_through_the_wire(pdu: Pdu, hd: bool, dd: bool) -> None:
    header, payload = pdu.encode()
    wire = b"".join(bytes(p) for p in frame_pdu(header, payload, header_digest=hd, data_digest=dd))
    assert len(wire) % 4 == 0
    reader = PduReader(1 << 24)
    reader.header_digest, reader.data_digest = hd, dd
    reader.feed(wire)
    raw = reader.next_pdu()
    assert raw is not None and raw.data_digest_ok and reader.buffered == 0
    decoded = decode_pdu(raw.bhs, raw.ahs, raw.data)
    if isinstance(pdu, ScsiCommand):
        pdu.cdb = pdu.cdb  # the codec keeps the full CDB (16 bytes + extended CDB AHS)
    assert _as_tuple(decoded) == _as_tuple(pdu)


@given(st.binary(min_size=BHS_LENGTH, max_size=BHS_LENGTH), st.binary(max_size=64))
def test_any_header_decodes_or_raises_pdu_error(bhs: bytes, ahs: bytes) -> None:
    with contextlib.suppress(PduError):
        decode_pdu(bhs, ahs[: len(ahs) // 4 * 4], b"")


@given(st.lists(st.binary(max_size=200), max_size=20), st.booleans())
def test_random_streams_only_yield_pdus_or_framing_errors(chunks: list[bytes], hd: bool) -> None:
    reader = PduReader(4096)
    reader.header_digest = hd
    try:
        for chunk in chunks:
            reader.feed(chunk)
            while (raw := reader.next_pdu()) is not None:
                assert len(raw.bhs) == BHS_LENGTH
                with contextlib.suppress(PduError):
                    decode_pdu(raw.bhs, raw.ahs, raw.data)
    except FramingError:
        pass


@given(st.binary(max_size=500), st.binary(max_size=500))
def test_crc32c_continues_across_parts(a: bytes, b: bytes) -> None:
    assert crc32c(a + b) == crc32c(b, crc32c(a))
    assert digest_bytes(a, b) == crc32c(a + b).to_bytes(4, "little")


def test_crc32c_reference_values() -> None:
    assert crc32c(b"123456789") == 0xE3069283
    assert digest_bytes(bytes(32)) == bytes.fromhex("aa36918a")  # RFC 3720 B.4
    assert digest_bytes(b"\xff" * 32) == bytes.fromhex("43aba862")


KEY = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-+@_",
              min_size=1, max_size=63)  # fmt: skip
VALUE = st.text(st.characters(exclude_characters="\0", exclude_categories=["Cs"]),
                max_size=255)  # fmt: skip


@given(st.lists(st.tuples(KEY, VALUE), max_size=20))
def test_text_round_trips(pairs: list[tuple[str, str]]) -> None:
    assert decode_text(encode_text(pairs)) == pairs


@given(st.binary(max_size=300))
def test_arbitrary_text_decodes_or_raises_text_error(blob: bytes) -> None:
    with contextlib.suppress(TextError):
        decode_text(blob)
