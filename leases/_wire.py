"""Hand-written protobuf wire format for the etcd transactions sent on every hold.

protobuf 3.20 (pinned: python-etcd3 0.12's generated modules need protobuf < 4) runs in pure
Python on Python 3.11, where building, serializing and parsing the nested ``TxnRequest`` /
``TxnResponse`` messages costs more client CPU than the rest of an acquire + release. The
few request shapes :class:`leases.etcd.EtcdClient` sends per hold are therefore encoded here
by hand, and their answers decoded by hand; the bytes are the same as
``etcdserverpb.TxnRequest(...).SerializeToString()`` (checked byte for byte in
``tests/leases/test_wire.py``), and the decoder reads what ``TxnResponse.FromString`` would.
The prefix range read on every trigger (the dedup gate) and breaker check goes the same way.

The wire format (https://protobuf.dev/programming-guides/encoding/): a message is a sequence of
fields, each a *tag* (``field_number << 3 | wire_type`` as a varint) followed by the value:
wire type 0 (varint) for integers, enums and bools, wire type 2 (length-delimited: a varint
length, then the bytes) for bytes, strings and nested messages. Integers are base-128
varints, low 7 bits first, the high bit of each byte set when more bytes follow; a negative
int64 is its 64-bit two's complement (ten bytes). proto3 leaves out a field that holds its
default (0, empty), except a field inside a ``oneof``, which is written whenever it is set;
protobuf writes fields in field-number order. Field numbers below are from etcd's
``rpc.proto`` / ``kv.proto`` (etcd v3.4).

This module imports nothing: it only turns numbers and bytes into bytes and back.
"""

from __future__ import annotations

from typing import NamedTuple

_VARINT = 0
_FIXED64 = 1
_LENGTH_DELIMITED = 2
_FIXED32 = 5

_INT64_MASK = (1 << 64) - 1

# etcdserverpb.Compare.CompareTarget.CREATE; CompareResult.EQUAL is 0, proto3's default,
# so it is never written.
_TARGET_CREATE = 1


def varint(value: int) -> bytes:
    """``value`` as a base-128 varint; a negative value as its 64-bit two's complement.

    :param value: an integer in the int64 or uint64 range.
    """
    if 0 <= value < 0x80:
        return bytes((value,))
    value &= _INT64_MASK
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _tag(field: int, wire_type: int) -> bytes:
    return varint(field << 3 | wire_type)


def _length_delimited(tag: bytes, payload: bytes) -> bytes:
    """A bytes, string or nested-message field, written even when ``payload`` is empty."""
    return tag + varint(len(payload)) + payload


def _optional_bytes(tag: bytes, payload: bytes) -> bytes:
    """A proto3 bytes field: nothing when empty (the default)."""
    return tag + varint(len(payload)) + payload if payload else b""


def _optional_int(tag: bytes, value: int) -> bytes:
    """A proto3 int64 field outside a oneof: nothing when 0 (the default)."""
    return tag + varint(value) if value else b""


# Tags, precomputed: (field number, wire type) of each field used.
_TXN_COMPARE = _tag(1, _LENGTH_DELIMITED)  # TxnRequest.compare (repeated Compare)
_TXN_SUCCESS = _tag(2, _LENGTH_DELIMITED)  # TxnRequest.success (repeated RequestOp)
_TXN_FAILURE = _tag(3, _LENGTH_DELIMITED)  # TxnRequest.failure (repeated RequestOp)
_COMPARE_TARGET = _tag(2, _VARINT)  # Compare.target (enum CompareTarget)
_COMPARE_KEY = _tag(3, _LENGTH_DELIMITED)  # Compare.key
_COMPARE_CREATE_REVISION = _tag(5, _VARINT)  # Compare.create_revision (oneof target_union)
_OP_RANGE = _tag(1, _LENGTH_DELIMITED)  # RequestOp.request_range (oneof request)
_OP_PUT = _tag(2, _LENGTH_DELIMITED)  # RequestOp.request_put (oneof request)
_OP_DELETE_RANGE = _tag(3, _LENGTH_DELIMITED)  # RequestOp.request_delete_range (oneof)
_OP_TXN = _tag(4, _LENGTH_DELIMITED)  # RequestOp.request_txn (oneof; etcd 3.3+)
_KEY = _tag(1, _LENGTH_DELIMITED)  # PutRequest / RangeRequest / DeleteRangeRequest .key
_PUT_VALUE = _tag(2, _LENGTH_DELIMITED)  # PutRequest.value
_PUT_LEASE = _tag(3, _VARINT)  # PutRequest.lease


def _compare_created_at(key: bytes, create_revision: int) -> bytes:
    """``Compare(key=key, target=CREATE, result=EQUAL, create_revision=create_revision)``.

    ``create_revision`` is in the ``target_union`` oneof, so it is written even when 0 (the
    "key does not exist" compare).
    """
    return (
        _COMPARE_TARGET
        + varint(_TARGET_CREATE)
        + _optional_bytes(_COMPARE_KEY, key)
        + _COMPARE_CREATE_REVISION
        + varint(create_revision)
    )


def _put(key: bytes, value: bytes, lease_id: int) -> bytes:
    """``RequestOp(request_put=PutRequest(key=key, value=value, lease=lease_id))``."""
    put = _optional_bytes(_KEY, key) + _optional_bytes(_PUT_VALUE, value)
    put += _optional_int(_PUT_LEASE, lease_id)
    return _length_delimited(_OP_PUT, put)


def create_txn(key: bytes, value: bytes, lease_id: int) -> bytes:
    """The ``TxnRequest`` that creates ``key`` only if it does not exist.

    compare ``create_revision(key) == 0``; success: put ``key`` = ``value`` on ``lease_id``
    (0: no lease); failure: range ``key`` (read the current holder).
    """
    return (
        _length_delimited(_TXN_COMPARE, _compare_created_at(key, 0))
        + _length_delimited(_TXN_SUCCESS, _put(key, value, lease_id))
        + _length_delimited(_TXN_FAILURE, _length_delimited(_OP_RANGE, _optional_bytes(_KEY, key)))
    )


def delete_if_created_at_txn(key: bytes, create_revision: int) -> bytes:
    """The ``TxnRequest`` that deletes ``key`` only while its create revision is the given one."""
    return _length_delimited(
        _TXN_COMPARE, _compare_created_at(key, create_revision)
    ) + _length_delimited(
        _TXN_SUCCESS, _length_delimited(_OP_DELETE_RANGE, _optional_bytes(_KEY, key))
    )


def nested_txn(requests: list[bytes]) -> bytes:
    """The ``TxnRequest`` with no compare whose success branch is ``requests`` (each an
    encoded ``TxnRequest``), as ``RequestOp(request_txn=...)``: etcd evaluates every one's
    compare against the store as it was before the whole, and applies them at one revision.
    """
    return b"".join(
        _length_delimited(_TXN_SUCCESS, _length_delimited(_OP_TXN, r)) for r in requests
    )


def put_if_created_at_txn(
    guard_key: bytes, create_revision: int, key: bytes, value: bytes
) -> bytes:
    """The ``TxnRequest`` that puts ``key`` = ``value`` (no lease) only while ``guard_key``'s
    create revision is ``create_revision`` (a fenced write)."""
    return _length_delimited(
        _TXN_COMPARE, _compare_created_at(guard_key, create_revision)
    ) + _length_delimited(_TXN_SUCCESS, _put(key, value, 0))


# RangeRequest's fields (etcd's rpc.proto); enum values of RangeRequest.SortOrder/SortTarget.
_RANGE_END = _tag(2, _LENGTH_DELIMITED)  # RangeRequest.range_end
_RANGE_LIMIT = _tag(3, _VARINT)  # RangeRequest.limit
_RANGE_SORT_ORDER = _tag(5, _VARINT)  # RangeRequest.sort_order
_RANGE_SORT_TARGET = _tag(6, _VARINT)  # RangeRequest.sort_target
SORT_ASCEND = 1
SORT_DESCEND = 2
SORT_BY_CREATE = 2


def range_request(
    key: bytes, range_end: bytes, *, limit: int = 0, sort_order: int = 0, sort_target: int = 0
) -> bytes:
    """``RangeRequest(key=key, range_end=range_end, limit=limit, sort_order=sort_order,
    sort_target=sort_target)``: the keys in ``[key, range_end)``, sorted as asked."""
    return (
        _optional_bytes(_KEY, key)
        + _optional_bytes(_RANGE_END, range_end)
        + _optional_int(_RANGE_LIMIT, limit)
        + _optional_int(_RANGE_SORT_ORDER, sort_order)
        + _optional_int(_RANGE_SORT_TARGET, sort_target)
    )


# -- answers ------------------------------------------------------------------------------


class WireKeyValue(NamedTuple):
    """The fields of an ``mvccpb.KeyValue`` that a lease reads (``version`` is skipped)."""

    key: bytes
    create_revision: int
    mod_revision: int
    value: bytes
    lease: int


class TxnReply(NamedTuple):
    """What a lease reads from a ``TxnResponse``.

    ``revision`` is ``header.revision``; ``range_kvs`` are the ``kvs`` of the last
    ``ResponseOp`` when that is a ``response_range`` (empty otherwise) — in the create
    transaction, the current holder when the key already existed.
    """

    succeeded: bool
    revision: int
    range_kvs: list[WireKeyValue]


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    """The varint at ``buf[pos:]`` (as an unsigned 64-bit number) and the position after it."""
    if pos < len(buf) and buf[pos] < 0x80:  # one byte: tags, lengths, small numbers
        return buf[pos], pos + 1
    result = 0
    shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result & _INT64_MASK, pos
        shift += 7
        if shift >= 70:
            raise ValueError("varint longer than 10 bytes")


def _int64(value: int) -> int:
    """An unsigned 64-bit varint read as int64 (two's complement)."""
    return value - (1 << 64) if value >= 1 << 63 else value


def _fields(buf: bytes) -> list[tuple[int, int, int, int]]:
    """Every field of the message ``buf``: ``(field number, wire type, a, b)``.

    For a varint field ``a`` is its value (``b`` unused); for a length-delimited field the
    payload is ``buf[a:b]``. Fixed-width fields are skipped over (none of the fields read
    here is fixed-width, but an unknown one may be); groups (wire types 3, 4: proto2 only)
    and anything that runs past the end raise ValueError.
    """
    out: list[tuple[int, int, int, int]] = []
    pos, end = 0, len(buf)
    while pos < end:
        key = buf[pos]
        if key < 0x80:  # a one-byte tag (every field number below 16): no call
            pos += 1
        else:
            key, pos = _read_varint(buf, pos)
        field, wire_type = key >> 3, key & 7
        if field == 0:
            raise ValueError("field number 0")
        if wire_type == _VARINT:
            value, pos = _read_varint(buf, pos)
            out.append((field, wire_type, value, 0))
        elif wire_type == _LENGTH_DELIMITED:
            length, pos = _read_varint(buf, pos)
            if pos + length > end:
                raise ValueError("truncated length-delimited field")
            out.append((field, wire_type, pos, pos + length))
            pos += length
        elif wire_type == _FIXED64:
            pos += 8
        elif wire_type == _FIXED32:
            pos += 4
        else:
            raise ValueError(f"unsupported wire type {wire_type}")
        if pos > end:
            raise ValueError("truncated fixed-width field")
    return out


def _key_value(buf: bytes) -> WireKeyValue:
    """``mvccpb.KeyValue``: key 1, create_revision 2, mod_revision 3, value 5, lease 6."""
    key = value = b""
    create_revision = mod_revision = lease = 0
    for field, wire_type, a, b in _fields(buf):
        if wire_type == _LENGTH_DELIMITED:
            if field == 1:
                key = buf[a:b]
            elif field == 5:
                value = buf[a:b]
        elif wire_type == _VARINT:
            if field == 2:
                create_revision = _int64(a)
            elif field == 3:
                mod_revision = _int64(a)
            elif field == 6:
                lease = _int64(a)
    return WireKeyValue(key, create_revision, mod_revision, value, lease)


def _range_kvs(buf: bytes) -> list[WireKeyValue]:
    """``RangeResponse.kvs`` (field 2, repeated KeyValue)."""
    return [
        _key_value(buf[a:b])
        for field, wire_type, a, b in _fields(buf)
        if field == 2 and wire_type == _LENGTH_DELIMITED
    ]


def _response_op_range_kvs(buf: bytes) -> list[WireKeyValue]:
    """The kvs of a ``ResponseOp`` whose ``response`` oneof is ``response_range`` (field 1).

    As protobuf parses: the last oneof member on the wire wins, and repeated occurrences of
    ``response_range`` merge (their kvs add up).
    """
    kvs: list[WireKeyValue] = []
    for field, wire_type, a, b in _fields(buf):
        if wire_type != _LENGTH_DELIMITED:
            continue
        if field == 1:
            kvs += _range_kvs(buf[a:b])
        elif field in (2, 3, 4):  # response_put, response_delete_range, response_txn
            kvs = []
    return kvs


def _header_revision(header: bytes, revision: int) -> int:
    """``ResponseHeader.revision`` (field 3) of ``header``; ``revision`` when it has none
    (a header repeated on the wire merges into the one before, as protobuf does)."""
    for field, wire_type, value, _ in _fields(header):
        if field == 3 and wire_type == _VARINT:
            revision = _int64(value)
    return revision


def decode_txn_response(buf: bytes) -> TxnReply:
    """Read ``etcdserverpb.TxnResponse`` bytes: header 1 (revision 3), succeeded 2, responses 3.

    Raises ValueError on bytes that are not a well-formed message.
    """
    succeeded = False
    revision = 0
    last_response: tuple[int, int] | None = None
    for field, wire_type, a, b in _fields(buf):
        if field == 1 and wire_type == _LENGTH_DELIMITED:
            revision = _header_revision(buf[a:b], revision)
        elif field == 2 and wire_type == _VARINT:
            succeeded = a != 0
        elif field == 3 and wire_type == _LENGTH_DELIMITED:
            last_response = (a, b)
    kvs = _response_op_range_kvs(buf[last_response[0] : last_response[1]]) if last_response else []
    return TxnReply(succeeded, revision, kvs)


def decode_nested_txn_response(buf: bytes) -> list[TxnReply]:
    """Read the ``TxnResponse`` of a :func:`nested_txn`: one :class:`TxnReply` per nested
    transaction, in their order, each with the outer header's revision (the one their
    writes were made at).

    Raises ValueError on bytes that are not a well-formed message.
    """
    revision = 0
    inner: list[TxnReply] = []
    for field, wire_type, a, b in _fields(buf):
        if field == 1 and wire_type == _LENGTH_DELIMITED:
            revision = _header_revision(buf[a:b], revision)
        elif field == 3 and wire_type == _LENGTH_DELIMITED:
            op = buf[a:b]
            for o_field, o_wire_type, c, d in _fields(op):
                if o_field == 4 and o_wire_type == _LENGTH_DELIMITED:  # response_txn
                    inner.append(decode_txn_response(op[c:d]))
    return [reply._replace(revision=revision) for reply in inner]


def decode_range_response(buf: bytes) -> list[WireKeyValue]:
    """Read the ``kvs`` (field 2) of ``etcdserverpb.RangeResponse`` bytes, in their order.

    Raises ValueError on bytes that are not a well-formed message.
    """
    return _range_kvs(buf)


class StatusReply(NamedTuple):
    """What :func:`decode_status_response` reads of a ``StatusResponse``."""

    member_id: int
    revision: int
    db_size: int
    db_size_in_use: int
    leader: int
    raft_index: int


def decode_status_response(buf: bytes) -> StatusReply:
    """Read ``etcdserverpb.StatusResponse`` bytes: header 1 (member_id 2, revision 3),
    dbSize 3, leader 4, raftIndex 5, dbSizeInUse 9 (etcd 3.4; 0 from older servers).

    python-etcd3's generated ``StatusResponse`` predates ``dbSizeInUse``, hence this decoder.
    Raises ValueError on bytes that are not a well-formed message.
    """
    member_id = revision = db_size = in_use = leader = raft_index = 0
    for field, wire_type, a, b in _fields(buf):
        if field == 1 and wire_type == _LENGTH_DELIMITED:
            for h_field, h_wire_type, h_value, _ in _fields(buf[a:b]):
                if h_wire_type != _VARINT:
                    continue
                if h_field == 2:
                    member_id = h_value
                elif h_field == 3:
                    revision = _int64(h_value)
        elif wire_type == _VARINT:
            if field == 3:
                db_size = _int64(a)
            elif field == 4:
                leader = a
            elif field == 5:
                raft_index = a
            elif field == 9:
                in_use = _int64(a)
    return StatusReply(member_id, revision, db_size, in_use, leader, raft_index)
