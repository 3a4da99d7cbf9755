"""CDB field decoding for the 6/10/12/16/32-byte forms (SBC-4 clause 5)."""

import pytest
from hypothesis import given
from hypothesis import strategies as st
from scsi_core.cdb import (
    BlockCdb,
    CdbError,
    FlagSet,
    allocation_length,
    block_cdb_opcodes,
    control_byte,
    decode_block_cdb,
    encode_block_cdb,
    flag_set,
    naca,
    parameter_list_length,
    service_action,
)
from scsi_core.opcodes import Opcode, VariableLength


def test_encode_out_of_range_field() -> None:
    with pytest.raises(CdbError):
        encode_block_cdb(BlockCdb(0x28, 0, 70000))
    with pytest.raises(CdbError):
        encode_block_cdb(BlockCdb(0x08, 1 << 21, 1))


def test_read10_fields() -> None:
    cdb = bytes((0x28, 0x18, 0x00, 0x01, 0x02, 0x03, 0x05, 0x00, 0x08, 0x04))
    c = decode_block_cdb(cdb)
    assert (c.lba, c.length, c.dpo, c.fua, c.group, c.control) == (0x10203, 8, True, True, 5, 4)


def test_read6_zero_length_means_256() -> None:
    c = decode_block_cdb(bytes((0x08, 0x1F, 0xFF, 0xFF, 0x00, 0x00)))
    assert (c.lba, c.length) == (0x1FFFFF, 256)
    assert encode_block_cdb(c)[4] == 0


def test_write_same16_flags() -> None:
    cdb = bytearray(16)
    cdb[0], cdb[1] = 0x93, 0x08 | 0x01 | 0x10
    c = decode_block_cdb(cdb)
    assert (c.unmap, c.ndob, c.anchor, c.fua) == (True, True, True, False)


def test_verify_bytchk_and_sync_immed() -> None:
    assert decode_block_cdb(bytes((0x2F, 0x06)) + bytes(8)).bytchk == 3
    assert decode_block_cdb(bytes((0x35, 0x02)) + bytes(8)).immed


def test_compare_and_write_layout() -> None:
    cdb = bytes((0x89, 0x08)) + (7).to_bytes(8, "big") + bytes(3) + bytes((2, 0, 0))
    c = decode_block_cdb(cdb)
    assert (c.lba, c.length, c.fua) == (7, 2, True)


def test_32_byte_read() -> None:
    c = BlockCdb(0x7F, lba=2**40, length=9, fua=True, service_action=VariableLength.READ_32)
    raw = encode_block_cdb(c)
    assert len(raw) == 32 and raw[7] == 0x18 and raw[8:10] == b"\x00\x09"
    assert decode_block_cdb(raw) == c


@pytest.mark.parametrize(
    "cdb", [b"", b"\x28\x00", bytes((0x12,)) + bytes(5), bytes((0x7F,)) + bytes(31)]
)
def test_decode_errors(cdb: bytes) -> None:
    with pytest.raises(CdbError):
        decode_block_cdb(cdb)


def _flags_for(kind: FlagSet | None) -> st.SearchStrategy[dict[str, object]]:
    protect = st.integers(0, 7)
    if kind is FlagSet.READ_WRITE:
        return st.fixed_dictionaries(
            {"protect": protect, "dpo": st.booleans(), "fua": st.booleans()}
        )
    if kind is FlagSet.VERIFY:
        return st.fixed_dictionaries(
            {"protect": protect, "dpo": st.booleans(), "bytchk": st.integers(0, 3)}
        )
    if kind is FlagSet.WRITE_SAME:
        return st.fixed_dictionaries(
            {
                "protect": protect,
                "anchor": st.booleans(),
                "unmap": st.booleans(),
                "ndob": st.booleans(),
            }
        )
    if kind is FlagSet.CACHE:
        return st.fixed_dictionaries({"immed": st.booleans()})
    return st.fixed_dictionaries({})


@st.composite
def block_cdbs(draw: st.DrawFn) -> BlockCdb:
    opcode = draw(st.sampled_from(sorted(block_cdb_opcodes())))
    sa = 0
    if opcode == Opcode.VARIABLE_LENGTH:
        sa = draw(st.sampled_from([v for v in VariableLength if flag_set(0x7F, v) is not None]))
    kind = flag_set(opcode, sa)
    raw = encode_block_cdb(BlockCdb(opcode, 0, 1, service_action=sa))
    if len(raw) == 6:
        lba, length = draw(st.integers(0, 2**21 - 1)), draw(st.integers(1, 256))
        return BlockCdb(opcode, lba, length, control=draw(st.integers(0, 255)))
    lba_bits = {10: 32, 12: 32}.get(len(raw), 64)
    len_bits = {10: 16, 32: 32, 12: 32}.get(len(raw), 8 if opcode == 0x89 else 32)
    return BlockCdb(
        opcode,
        draw(st.integers(0, 2**lba_bits - 1)),
        draw(st.integers(0, 2**len_bits - 1)),
        group=draw(st.integers(0, 31)),
        control=draw(st.integers(0, 255)),
        service_action=sa,
        **draw(_flags_for(kind)),  # type: ignore[arg-type]
    )


@given(block_cdbs())
def test_encode_decode_round_trip(c: BlockCdb) -> None:
    assert decode_block_cdb(encode_block_cdb(c)) == c


@given(st.sampled_from(sorted(block_cdb_opcodes() - {0x7F})), st.binary(min_size=31, max_size=31))
def test_decode_is_idempotent_on_random_bytes(opcode: int, rest: bytes) -> None:
    c = decode_block_cdb(bytes((opcode,)) + rest)
    assert decode_block_cdb(encode_block_cdb(c)) == c


def test_allocation_and_parameter_list_lengths() -> None:
    assert allocation_length(bytes((0x12, 1, 0x80, 0x01, 0x02, 0))) == 0x102
    assert allocation_length(bytes((0xA0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0))) == 256
    assert allocation_length(bytes((0x9E, 0x10)) + bytes(8) + b"\x00\x00\x00\x20" + bytes(2)) == 32
    assert allocation_length(bytes((0x28,)) + bytes(9)) is None
    assert allocation_length(b"\x12\x00") is None
    assert parameter_list_length(bytes((0x42,)) + bytes(6) + b"\x00\x18\x00") == 24
    assert parameter_list_length(bytes((0x15, 0x10, 0, 0, 12, 0))) == 12
    assert parameter_list_length(b"") is None


def test_service_action_and_control() -> None:
    assert service_action(bytes((0x9E, 0xF0))) == 0x10
    assert service_action(bytes((0x28, 0xFF))) is None
    assert service_action(bytes((0x7F,)) + bytes(7) + b"\x00\x0b") == 0x0B
    padded = bytes((0x28,)) + bytes(8) + b"\x04" + bytes(22)  # virtio pads to 32 bytes
    assert control_byte(padded) == 4 and naca(4)
    assert control_byte(bytes((0x7F, 0x04)) + bytes(30)) == 4
    assert control_byte(b"\x28") == 0
