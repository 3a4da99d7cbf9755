"""Sense data build/parse (SPC-5 4.4)."""

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st
from scsi_core.sense import (
    FIXED_SENSE_LENGTH,
    Asc,
    FieldPointer,
    SenseData,
    SenseError,
    SenseKey,
    build_sense,
    parse_sense,
)


def test_fixed_layout_invalid_field_in_cdb_with_pointer() -> None:
    sense = build_sense(SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_CDB, FieldPointer(2, 4))
    assert len(sense) == FIXED_SENSE_LENGTH
    assert sense[0] == 0x70
    assert sense[2] == 0x05
    assert sense[7] == 10
    assert (sense[12], sense[13]) == (0x24, 0x00)
    # SKSV=1, C/D=1, BPV=1, bit pointer 4; field pointer 2 (SPC-5 table 31).
    assert sense[15:18] == bytes((0x80 | 0x40 | 0x08 | 4, 0x00, 0x02))


def test_descriptor_layout() -> None:
    data = SenseData.of(
        SenseKey.MEDIUM_ERROR, Asc.UNRECOVERED_READ_ERROR, information=0x1_0000_0000
    ).to_bytes(descriptor=True)
    assert data[:4] == bytes((0x72, 0x03, 0x11, 0x00))
    assert data[7] == 12
    assert data[8:12] == bytes((0x00, 0x0A, 0x80, 0x00))
    assert int.from_bytes(data[12:20], "big") == 0x1_0000_0000


def test_fixed_information_too_big_clears_valid() -> None:
    data = SenseData.of(SenseKey.MEDIUM_ERROR, Asc.UNRECOVERED_READ_ERROR, information=1 << 33)
    assert parse_sense(data.to_bytes()).information is None


def test_asc_properties_and_named_lookup() -> None:
    assert Asc.LOGICAL_BLOCK_ADDRESS_OUT_OF_RANGE.asc == 0x21
    assert Asc.CAPACITY_DATA_HAS_CHANGED.ascq == 0x09
    parsed = parse_sense(build_sense(SenseKey.DATA_PROTECT, Asc.WRITE_PROTECTED))
    assert Asc(parsed.code) is Asc.WRITE_PROTECTED
    assert parsed.field_pointer is None


def test_truncated_fixed_sense_parses() -> None:
    full = build_sense(SenseKey.UNIT_ATTENTION, Asc.POWER_ON_OCCURRED)
    assert parse_sense(full[:8]).key == SenseKey.UNIT_ATTENTION


@pytest.mark.parametrize(
    "data",
    [b"", bytes(7), b"\x7f" + bytes(17), b"\x72\x05\x24\x00\x00\x00\x00\x04\x02\x06\x00\x00"],
)
def test_malformed_sense_raises_sense_error(data: bytes) -> None:
    with pytest.raises(SenseError):
        parse_sense(data)


field_pointers = st.builds(
    FieldPointer,
    byte=st.integers(0, 0xFFFF),
    bit=st.none() | st.integers(0, 7),
    in_cdb=st.booleans(),
)


@st.composite
def sense_data(draw: st.DrawFn, *, descriptor: bool) -> SenseData:
    fp = draw(st.none() | field_pointers)
    max_info = 2**64 - 1 if descriptor else 0xFFFFFFFF
    max_cmd = 2**64 - 1 if descriptor else 0xFFFFFFFF
    return SenseData(
        key=draw(st.sampled_from(SenseKey)),
        asc=draw(st.integers(0, 255)),
        ascq=draw(st.integers(0, 255)),
        current=draw(st.booleans()),
        information=draw(st.none() | st.integers(0, max_info)),
        command_specific=draw(st.integers(0, max_cmd)),
        sks=fp.to_sks() if fp else None,
        fru=draw(st.integers(0, 255)),
        filemark=draw(st.booleans()),
        eom=draw(st.booleans()),
        ili=draw(st.booleans()),
    )


@given(sense_data(descriptor=False))
def test_fixed_round_trip(s: SenseData) -> None:
    assert parse_sense(s.to_bytes()) == s


@given(sense_data(descriptor=True))
def test_descriptor_round_trip(s: SenseData) -> None:
    assert parse_sense(s.to_bytes(descriptor=True)) == s


@given(field_pointers)
def test_field_pointer_round_trip(fp: FieldPointer) -> None:
    assert FieldPointer.from_sks(fp.to_sks()) == fp
    assert fp.to_sks() & 0x800000


@given(st.binary(max_size=64))
def test_parse_only_raises_sense_error(data: bytes) -> None:
    with contextlib.suppress(SenseError):
        parse_sense(data)
