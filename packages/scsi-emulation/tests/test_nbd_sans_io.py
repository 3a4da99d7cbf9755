"""The sans-IO NBD client: handshake and transmission decoding against scripted servers."""

from __future__ import annotations

import errno
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st
from scsi_emulation.backends import nbd_protocol as p
from scsi_emulation.backends.nbd_handshake import ClientHandshake
from scsi_emulation.backends.nbd_protocol import NbdHandshakeError, NbdProtocolError
from scsi_emulation.backends.nbd_transmission import Command, TransmissionClient

GREETING = p.SERVER_GREETING.pack(p.NBDMAGIC, p.IHAVEOPT, p.FLAG_FIXED_NEWSTYLE | p.FLAG_NO_ZEROES)


def opt_reply(option: int, kind: int, data: bytes = b"") -> bytes:
    return p.OPTION_REPLY_HEADER.pack(p.OPTION_REPLY_MAGIC, option, kind, len(data)) + data


def info_export(size: int, flags: int) -> bytes:
    return opt_reply(p.OPT_GO, p.REP_INFO, p.INFO_EXPORT_BODY.pack(p.INFO_EXPORT, size, flags))


def info_block(minimum: int, preferred: int, maximum: int) -> bytes:
    body = p.INFO_BLOCK_SIZE_BODY.pack(p.INFO_BLOCK_SIZE, minimum, preferred, maximum)
    return opt_reply(p.OPT_GO, p.REP_INFO, body)


def parse_options(sent: bytes) -> list[tuple[int, bytes]]:
    """The options a client sent (after its 4-byte flags)."""
    out = []
    pos = 4
    while pos < len(sent):
        magic, option, length = p.OPTION_HEADER.unpack_from(sent, pos)
        assert magic == p.IHAVEOPT
        pos += p.OPTION_HEADER.size
        out.append((option, sent[pos : pos + length]))
        pos += length
    return out


def full_server_reply(size: int = 1 << 20, flags: int = 0x1ED) -> bytes:
    return (
        opt_reply(p.OPT_STRUCTURED_REPLY, p.REP_ACK)
        + opt_reply(
            p.OPT_SET_META_CONTEXT, p.REP_META_CONTEXT, struct.pack(">I", 7) + b"base:allocation"
        )
        + opt_reply(p.OPT_SET_META_CONTEXT, p.REP_ACK)
        + info_export(size, flags)
        + info_block(512, 4096, 1 << 20)
        + opt_reply(p.OPT_GO, p.REP_ACK)
    )


@given(st.lists(st.integers(1, 40), max_size=30))
def test_handshake_any_split(cuts: list[int]) -> None:
    """However the server's bytes are cut, the outcome is the same."""
    hs = ClientHandshake("disk")
    stream = GREETING + full_server_reply()
    pos = 0
    sent = b""
    for n in [*cuts, len(stream)]:
        sent += hs.data_to_send()
        hs.receive_data(stream[pos : pos + n])
        pos += n
        if pos >= len(stream):
            break
    sent += hs.data_to_send()
    assert hs.done
    e = hs.export
    assert (e.name, e.size, e.flags) == ("disk", 1 << 20, 0x1ED)
    assert (e.minimum_block, e.preferred_block, e.maximum_block) == (512, 4096, 1 << 20)
    assert e.structured_replies and e.allocation_context == 7
    assert struct.unpack_from(">I", sent)[0] == p.FLAG_C_FIXED_NEWSTYLE | p.FLAG_C_NO_ZEROES
    options = parse_options(sent)
    assert [o for o, _ in options] == [p.OPT_STRUCTURED_REPLY, p.OPT_SET_META_CONTEXT, p.OPT_GO]
    meta = options[1][1]
    assert meta == struct.pack(">I", 4) + b"disk" + struct.pack(">II", 1, 15) + b"base:allocation"
    assert options[2][1] == struct.pack(">I", 4) + b"disk" + struct.pack(
        ">HH", 1, p.INFO_BLOCK_SIZE
    )


def test_bytes_wanted_never_reads_past_the_negotiation() -> None:
    hs = ClientHandshake("")
    stream = GREETING + full_server_reply()
    pos = 0
    while not hs.done:
        want = hs.bytes_wanted()
        assert 0 < want <= len(stream) - pos
        hs.receive_data(stream[pos : pos + want])
        pos += want
    assert pos == len(stream) and hs.bytes_wanted() == 0
    with pytest.raises(NbdHandshakeError):
        hs.receive_data(b"x")


def test_no_structured_replies_and_export_name_fallback() -> None:
    """An old server: no structured replies, no OPT_GO (falls back to OPT_EXPORT_NAME)."""
    greeting = p.SERVER_GREETING.pack(p.NBDMAGIC, p.IHAVEOPT, p.FLAG_FIXED_NEWSTYLE)
    hs = ClientHandshake("old")
    hs.receive_data(greeting)
    hs.receive_data(opt_reply(p.OPT_STRUCTURED_REPLY, p.REP_ERR_UNSUP))
    hs.receive_data(opt_reply(p.OPT_GO, p.REP_ERR_UNSUP))
    assert not hs.done
    hs.receive_data(p.EXPORT_NAME_REPLY.pack(4096, p.FLAG_HAS_FLAGS | p.FLAG_READ_ONLY))
    assert not hs.done  # 124 zero bytes follow without NO_ZEROES
    hs.receive_data(bytes(124))
    assert hs.done and hs.export.size == 4096 and hs.export.read_only
    assert not hs.export.structured_replies and hs.export.allocation_context is None
    options = [o for o, _ in parse_options(hs.data_to_send())]
    assert options == [p.OPT_STRUCTURED_REPLY, p.OPT_GO, p.OPT_EXPORT_NAME]


@pytest.mark.parametrize(
    ("stream", "needle"),
    [
        (b"NOTMAGIC" + bytes(10), "not an NBD server"),
        (p.U64.pack(p.NBDMAGIC) + p.U64.pack(p.OLDSTYLE_MAGIC) + bytes(2), "oldstyle"),
        (p.SERVER_GREETING.pack(p.NBDMAGIC, p.IHAVEOPT, 0), "fixed newstyle"),
        (
            GREETING
            + opt_reply(p.OPT_STRUCTURED_REPLY, p.REP_ACK)
            + opt_reply(p.OPT_SET_META_CONTEXT, p.REP_ACK)
            + opt_reply(p.OPT_GO, p.REP_FLAG_ERROR | 6, b"nope"),
            "no such export: nope",
        ),
        (GREETING + p.OPTION_REPLY_HEADER.pack(1, p.OPT_STRUCTURED_REPLY, 1, 0), "magic"),
        (GREETING + opt_reply(p.OPT_GO, p.REP_ACK), "expected 8"),
        (
            GREETING
            + opt_reply(p.OPT_STRUCTURED_REPLY, p.REP_ACK)
            + opt_reply(p.OPT_SET_META_CONTEXT, p.REP_ACK)
            + opt_reply(p.OPT_GO, p.REP_ACK),
            "without describing",
        ),
    ],
)
def test_handshake_errors(stream: bytes, needle: str) -> None:
    hs = ClientHandshake("x")
    with pytest.raises(NbdHandshakeError, match=needle):
        hs.receive_data(stream)


# -- transmission -----------------------------------------------------------------------------


def chunk(cookie: int, kind: int, payload: bytes, done: bool = False) -> bytes:
    flags = p.REPLY_FLAG_DONE if done else 0
    head = p.STRUCTURED_REPLY.pack(p.STRUCTURED_REPLY_MAGIC, flags, kind, cookie, len(payload))
    return head + payload


def feed(client: TransmissionClient, stream: bytes, cuts: list[int]) -> list[Command]:
    """Feed ``stream`` cut at ``cuts``, taking the direct-receive path when offered."""
    done: list[Command] = []
    pos = 0
    cuts = [*cuts, len(stream)]
    i = 0
    while pos < len(stream):
        n = min(max(cuts[i % len(cuts)], 1), len(stream) - pos)
        i += 1
        dest = client.payload_buffers()
        if dest and i % 2:  # every other time, receive straight into the destination
            k = 0
            for view in dest:
                take = min(len(view), n - k)
                view[:take] = stream[pos + k : pos + k + take]
                k += take
                if k == n:
                    break
            done += client.payload_received(k)
            pos += k
        else:
            done += client.receive_data(memoryview(stream)[pos : pos + n])
            pos += n
    return done


def test_request_header_and_cookies() -> None:
    client = TransmissionClient(structured=True)
    a = Command(p.CMD_WRITE, 4096, 512, p.CMD_FLAG_FUA)
    b = Command(p.CMD_FLUSH, 0, 0)
    ha, hb = client.request(a), client.request(b)
    assert p.REQUEST.unpack(ha) == (
        p.REQUEST_MAGIC,
        p.CMD_FLAG_FUA,
        p.CMD_WRITE,
        a.cookie,
        4096,
        512,
    )
    assert a.cookie != b.cookie and set(client.pending) == {a.cookie, b.cookie}
    assert p.REQUEST.unpack(hb)[2] == p.CMD_FLUSH


@given(
    data=st.binary(min_size=1, max_size=3000),
    split=st.integers(0, 3000),
    pieces=st.lists(st.integers(1, 700), min_size=1, max_size=6),
    cuts=st.lists(st.integers(1, 200), max_size=20),
)
def test_structured_read_reassembles(
    data: bytes, split: int, pieces: list[int], cuts: list[int]
) -> None:
    """Chunks in any order land at their offsets in scattered buffers; holes are zeros."""
    split = min(split, len(data))
    length = len(data)
    base = 1 << 20
    client = TransmissionClient(structured=True)
    out = bytearray(b"\xee" * length)
    view = memoryview(out)
    bufs, pos = [], 0
    for n in pieces:
        if pos >= length:
            break
        bufs.append(view[pos : pos + n])
        pos += n
    if pos < length:
        bufs.append(view[pos:])
    cmd = Command(p.CMD_READ, base, length, buffers=bufs)
    client.request(cmd)
    # second part first, as data; the first part as a hole (the expected data is zeros there)
    expected = bytes(split) + data[split:]
    stream = b""
    if split < length:
        stream += chunk(
            cmd.cookie, p.REPLY_TYPE_OFFSET_DATA, p.U64.pack(base + split) + data[split:]
        )
    if split:
        stream += chunk(cmd.cookie, p.REPLY_TYPE_OFFSET_HOLE, p.OFFSET_HOLE_BODY.pack(base, split))
    stream += chunk(cmd.cookie, p.REPLY_TYPE_NONE, b"", done=True)
    assert feed(client, stream, cuts) == [cmd]
    assert cmd.error == 0 and bytes(out) == expected and not client.pending


def test_simple_replies_in_any_order() -> None:
    client = TransmissionClient(structured=False)
    out = bytearray(8)
    r = Command(p.CMD_READ, 0, 8, buffers=[memoryview(out)])
    w = Command(p.CMD_WRITE, 0, 8)
    client.request(r)
    client.request(w)
    stream = p.SIMPLE_REPLY.pack(p.SIMPLE_REPLY_MAGIC, 0, w.cookie)
    stream += p.SIMPLE_REPLY.pack(p.SIMPLE_REPLY_MAGIC, 0, r.cookie) + b"12345678"
    assert feed(client, stream, [3, 5]) == [w, r]
    assert out == b"12345678"


def test_errors_block_status_and_short_reads() -> None:
    client = TransmissionClient(structured=True, allocation_context=3)
    e = Command(p.CMD_WRITE, 0, 512)
    bs = Command(p.CMD_BLOCK_STATUS, 0, 1 << 20, p.CMD_FLAG_REQ_ONE)
    short = Command(p.CMD_READ, 0, 16, buffers=[memoryview(bytearray(16))])
    simple_err = Command(p.CMD_FLUSH, 0, 0)
    for c in (e, bs, short, simple_err):
        client.request(c)
    stream = chunk(
        e.cookie, p.REPLY_TYPE_ERROR, p.ERROR_BODY.pack(errno.ENOSPC, 4) + b"full", done=True
    )
    extents = p.EXTENT.pack(4096, 0) + p.EXTENT.pack(8192, p.STATE_HOLE | p.STATE_ZERO)
    stream += chunk(bs.cookie, p.REPLY_TYPE_BLOCK_STATUS, p.U32.pack(9) + p.EXTENT.pack(1, 0))
    stream += chunk(bs.cookie, p.REPLY_TYPE_BLOCK_STATUS, p.U32.pack(3) + extents, done=True)
    stream += chunk(short.cookie, p.REPLY_TYPE_OFFSET_DATA, p.U64.pack(0) + b"abcd", done=True)
    stream += p.SIMPLE_REPLY.pack(p.SIMPLE_REPLY_MAGIC, 999, simple_err.cookie)
    assert feed(client, stream, [7]) == [e, bs, short, simple_err]
    assert (e.error, e.message) == (errno.ENOSPC, "full")
    assert bs.error == 0 and bs.extents == [(4096, 0), (8192, 3)]
    assert short.error == errno.EIO and "4 of 16" in short.message
    assert simple_err.error == errno.EIO  # unknown NBD error values become EIO


@pytest.mark.parametrize(
    "make",
    [
        lambda c: p.SIMPLE_REPLY.pack(0x12345678, 0, c),
        lambda c: p.SIMPLE_REPLY.pack(p.SIMPLE_REPLY_MAGIC, 0, c + 1),
        lambda c: chunk(c, p.REPLY_TYPE_OFFSET_DATA, p.U64.pack(4096) + b"x", done=True),
        lambda c: chunk(c, p.REPLY_TYPE_OFFSET_HOLE, p.OFFSET_HOLE_BODY.pack(0, 1 << 20)),
        lambda c: chunk(c, 77, b""),
        lambda c: chunk(c, p.REPLY_TYPE_NONE, b"x"),
        lambda c: chunk(c, p.REPLY_TYPE_BLOCK_STATUS, bytes(12)),
    ],
)
def test_protocol_violations(make: object) -> None:
    client = TransmissionClient(structured=True)
    cmd = Command(p.CMD_READ, 0, 512, buffers=[memoryview(bytearray(512))])
    client.request(cmd)
    assert callable(make)
    with pytest.raises(NbdProtocolError):
        client.receive_data(memoryview(make(cmd.cookie)))


def test_take_pending_resets_for_resending() -> None:
    client = TransmissionClient(structured=True)
    a = Command(p.CMD_READ, 0, 8, buffers=[memoryview(bytearray(8))])
    b = Command(p.CMD_FLUSH, 0, 0)
    client.request(a)
    client.request(b)
    client.receive_data(
        memoryview(chunk(a.cookie, p.REPLY_TYPE_OFFSET_DATA, p.U64.pack(0) + b"ab"))
    )
    assert client.payload_buffers() is None and a.received == 2
    assert client.take_pending() == [a, b]
    assert a.received == 0 and not client.pending and a.attempts == 1


@given(
    sizes=st.lists(st.integers(1, 600), min_size=1, max_size=12),
    cuts=st.lists(st.integers(1, 300), max_size=20),
)
def test_a_burst_of_replies_decodes_whole_or_cut(sizes: list[int], cuts: list[int]) -> None:
    """Many replies in one stream (what one receive holds at queue depth 32): decoded where
    they lie when whole, collected when cut, with the same outcome either way."""
    client = TransmissionClient(structured=True)
    reads: list[tuple[Command, bytes, bytearray]] = []
    stream = b""
    for i, n in enumerate(sizes):
        if i % 3 == 2:  # a write among the reads: a bare NONE chunk
            w = Command(p.CMD_WRITE, 0, n)
            client.request(w)
            stream += chunk(w.cookie, p.REPLY_TYPE_NONE, b"", done=True)
            continue
        out = bytearray(n)
        cmd = Command(p.CMD_READ, 4096 * i, n, buffers=[memoryview(out)])
        client.request(cmd)
        data = bytes((i + k) & 0xFF for k in range(n))
        stream += chunk(cmd.cookie, p.REPLY_TYPE_OFFSET_DATA, p.U64.pack(4096 * i) + data, True)
        reads.append((cmd, data, out))
    done = feed(client, stream, cuts)
    assert len(done) == len(sizes) and not client.pending
    assert all(c.error == 0 for c in done)
    for cmd, data, out in reads:
        assert bytes(out) == data, cmd
