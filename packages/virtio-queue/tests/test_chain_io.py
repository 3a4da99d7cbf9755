"""ChainReader / ChainWriter: the data-movement protocol over scatter-gather buffers."""

from __future__ import annotations

import os
import tempfile

import pytest
from hypothesis import given
from hypothesis import strategies as st
from virtio_queue import ChainReader, ChainWriter, DescriptorChain

sizes = st.lists(st.integers(0, 40), min_size=0, max_size=8)


def split(data: bytearray, lengths: list[int]) -> list[memoryview]:
    view = memoryview(data)
    out, pos = [], 0
    for n in lengths:
        out.append(view[pos : pos + n])
        pos += n
    return out


def reader_over(data: bytes, lengths: list[int]) -> ChainReader:
    buf = bytearray(data)
    return ChainReader(split(buf, lengths), len(buf))


@given(sizes, st.lists(st.tuples(st.sampled_from(["read", "peek", "advance"]), st.integers(0, 50))))
def test_reader_matches_a_byte_string_model(lengths: list[int], ops: list[tuple[str, int]]) -> None:
    data = bytes(i & 0xFF for i in range(sum(lengths)))
    reader = reader_over(data, lengths)
    pos = 0
    for op, n in ops:
        assert reader.remaining() == len(data) - pos
        if op == "read":
            got = reader.read(n)
            assert got == data[pos : pos + n]
            pos += len(got)
        elif op == "peek":
            bufs = reader.buffers(n)
            assert b"".join(bufs) == data[pos : pos + n]
            assert all(len(b) for b in bufs)
            assert reader.remaining() == len(data) - pos  # buffers() consumes nothing
        else:
            step = min(n, len(data) - pos)
            reader.advance(step)
            pos += step
    assert reader.read(1 << 20) == data[pos:]
    assert reader.remaining() == 0


@given(sizes, st.lists(st.tuples(st.sampled_from(["write", "fill"]), st.binary(max_size=50))))
def test_writer_matches_a_byte_string_model(
    lengths: list[int], ops: list[tuple[str, bytes]]
) -> None:
    total = sum(lengths)
    backing = bytearray(total)
    writer = ChainWriter(split(backing, lengths), total)
    model = bytearray()
    for op, payload in ops:
        room = total - len(model)
        if op == "write":
            n = writer.write(payload)
            assert n == min(len(payload), room)
            model += payload[:n]
        else:  # what os.preadv does: fill buffers(), then advance
            bufs = writer.buffers(len(payload))
            assert sum(map(len, bufs)) == min(len(payload), room)
            pos = 0
            for b in bufs:
                b[:] = payload[pos : pos + len(b)]
                pos += len(b)
            writer.advance(pos)
            model += payload[:pos]
        assert writer.written == len(model)
        assert writer.remaining() == total - len(model)
    assert backing[: len(model)] == model


def test_header_across_descriptor_boundary() -> None:
    reader = reader_over(bytes(range(60)), [10, 41, 9])
    assert reader.read(51) == bytes(range(51))
    assert [bytes(b) for b in reader.buffers(100)] == [bytes(range(51, 60))]


def test_advance_past_the_end_is_refused() -> None:
    reader = reader_over(b"abc", [3])
    with pytest.raises(ValueError):
        reader.advance(4)
    with pytest.raises(ValueError):
        reader.advance(-1)
    assert reader.read(10) == b"abc"
    assert reader.read(10) == b""


def test_preadv_and_pwritev_through_the_chain() -> None:
    """The daemon's pattern: header by copy, then the payload straight into guest buffers."""
    guest = bytearray(64 + 4096)
    # Writable part: a 10-byte response header, then data split over three descriptors.
    writer = ChainWriter(split(guest, [10, 1000, 3000, 96 + 64]), len(guest))
    assert writer.write(b"RESPONSE!!") == 10
    payload = os.urandom(4096)
    with tempfile.TemporaryFile() as f:
        f.write(payload)
        f.flush()
        n = os.preadv(f.fileno(), writer.buffers(4096), 0)
        writer.advance(n)
        assert writer.written == 10 + 4096
        assert bytes(guest[10 : 10 + 4096]) == payload
        reader = ChainReader(split(guest, [10, 1000, 3000, 96 + 64]), len(guest))
        assert reader.read(10) == b"RESPONSE!!"
        n = os.pwritev(f.fileno(), reader.buffers(4096), 8192)
        reader.advance(n)
        f.seek(8192)
        assert f.read() == payload


def test_descriptor_chain_builds_reader_and_writer() -> None:
    out = bytearray(8)
    chain = DescriptorChain(3, [memoryview(b"in")], [memoryview(out)], 2, 8)
    assert chain.reader().read(5) == b"in"
    writer = chain.writer()
    assert writer.write(b"0123456789") == 8
    assert out == b"01234567"
    assert "head=3" in repr(chain)


@given(sizes, sizes, st.data())
def test_reader_and_writer_with_skip_equal_fresh_ones_advanced(
    rlens: list[int], wlens: list[int], data: st.DataObject
) -> None:
    """`reader(skip)` / `writer(skip)` (the fast start past a header) are exactly a fresh
    cursor advanced by `skip`: same remaining bytes, same buffers, same `written`."""
    rbuf = bytearray(i & 0xFF for i in range(sum(rlens)))
    wbuf = bytearray(sum(wlens))
    chain = DescriptorChain(0, split(rbuf, rlens), split(wbuf, wlens), len(rbuf), len(wbuf))
    rskip = data.draw(st.integers(0, len(rbuf)))
    wskip = data.draw(st.integers(0, len(wbuf)))
    reader, model_reader = chain.reader(rskip), chain.reader()
    model_reader.advance(rskip)
    writer, model_writer = chain.writer(wskip), chain.writer()
    model_writer.advance(wskip)
    assert reader.remaining() == model_reader.remaining()
    assert reader.read(len(rbuf)) == model_reader.read(len(rbuf)) == bytes(rbuf[rskip:])
    assert writer.written == model_writer.written == wskip
    assert [bytes(b) for b in writer.buffers(len(wbuf))] == [
        bytes(b) for b in model_writer.buffers(len(wbuf))
    ]
    payload = bytes(range(len(wbuf) - wskip))
    assert writer.write(payload) == len(payload)
    assert bytes(wbuf[wskip:]) == payload
    assert writer.written == len(wbuf)


def test_skip_beyond_the_chain_is_refused() -> None:
    buf = bytearray(8)
    chain = DescriptorChain(0, [memoryview(buf)], [memoryview(buf)], 8, 8)
    with pytest.raises(ValueError):
        chain.reader(9)
    with pytest.raises(ValueError):
        chain.writer(9)
