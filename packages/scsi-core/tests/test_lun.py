"""LUN field encoding (SAM-5 4.7)."""

import pytest
from hypothesis import given
from hypothesis import strategies as st
from scsi_core.lun import MAX_LUN, REPORT_LUNS_WLUN, LunError, assign_luns, decode_lun, encode_lun


def test_peripheral_and_flat_forms() -> None:
    assert encode_lun(0) == bytes(8)
    assert encode_lun(5) == b"\x00\x05" + bytes(6)
    assert encode_lun(256) == b"\x41\x00" + bytes(6)
    assert encode_lun(16383) == b"\x7f\xff" + bytes(6)
    assert encode_lun(REPORT_LUNS_WLUN) == b"\xc1\x01" + bytes(6)


@given(st.integers(0, MAX_LUN) | st.just(REPORT_LUNS_WLUN))
def test_round_trip(n: int) -> None:
    assert decode_lun(encode_lun(n)) == n


@pytest.mark.parametrize("n", [-1, MAX_LUN + 1, 0xC100])
def test_unencodable(n: int) -> None:
    with pytest.raises(LunError):
        encode_lun(n)


@pytest.mark.parametrize(
    "field",
    [
        b"\x01\x00" + bytes(6),  # peripheral, bus 1
        b"\x00\x01\x00\x02" + bytes(4),  # second level present
        b"\x80\x01" + bytes(6),  # logical unit addressing
        b"\xc1\x02" + bytes(6),  # another W-LUN
        bytes(7),
    ],
)
def test_unsupported_forms_decode_to_none(field: bytes) -> None:
    assert decode_lun(field) is None


def test_flat_space_for_small_lun_decodes() -> None:
    assert decode_lun(b"\x40\x07" + bytes(6)) == 7


@given(st.binary(min_size=0, max_size=10))
def test_decode_never_raises(field: bytes) -> None:
    result = decode_lun(field)
    assert result is None or 0 <= result <= MAX_LUN or result == REPORT_LUNS_WLUN


def test_assign_luns_numbers_in_order_and_honours_explicit_luns() -> None:
    assert assign_luns(["a", "5=b", "c"]) == [(0, "a"), (5, "b"), (6, "c")]
    # A bare item takes the first free LUN after the previous one.
    assert assign_luns(["3=a", "b", "2=c", "d"]) == [(3, "a"), (4, "b"), (2, "c"), (5, "d")]
    # "x=y" where x is not a number is a plain item (a path may contain '=').
    assert assign_luns(["img=1.raw"]) == [(0, "img=1.raw")]


@pytest.mark.parametrize(
    ("items", "message"),
    [
        (["16384=a"], "outside 0..16383"),
        (["1=a", "1=b"], "given twice"),
        (["a", "0=b"], "given twice"),
    ],
)
def test_assign_luns_rejects_bad_numbering(items: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        assign_luns(items)
