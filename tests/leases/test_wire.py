"""leases._wire against etcd3's generated protobuf messages (pure logic, no server).

The hand encoder must produce exactly ``SerializeToString()`` of the message EtcdClient used
to build, and the hand decoder must read what ``TxnResponse.FromString`` reads.
"""

from __future__ import annotations

from collections.abc import Iterable

import etcd3.etcdrpc as rpc
import pytest
from etcd3.etcdrpc import kv_pb2
from hypothesis import example, given, settings
from hypothesis import strategies as st

from leases import _wire

INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1
UINT64_MAX = (1 << 64) - 1

# Keys as EtcdClient makes them (str.encode()): any unicode text, including empty and NUL.
keys = st.text().map(str.encode)
values = st.binary(max_size=300)
# Lease ids and revisions are positive int64 in etcd; 0 (no lease / "does not exist") and the
# int64 extremes (varint boundaries, negative two's complement) are covered too.
int64s = st.one_of(
    st.sampled_from([0, 1, 127, 128, 16383, 16384, (1 << 32), INT64_MAX, -1, INT64_MIN]),
    st.integers(min_value=INT64_MIN, max_value=INT64_MAX),
    st.integers(min_value=0, max_value=INT64_MAX),
)


def compare_created_at(key: bytes, create_revision: int) -> rpc.Compare:
    return rpc.Compare(
        key=key,
        target=rpc.Compare.CREATE,
        result=rpc.Compare.EQUAL,
        create_revision=create_revision,
    )


@pytest.mark.parametrize(
    "value",
    [0, 1, 127, 128, 300, 16383, 16384, (1 << 35) + 7, INT64_MAX, (1 << 63), UINT64_MAX],
)
def test_varint_matches_protobuf_uint64(value: int) -> None:
    message = rpc.ResponseHeader(cluster_id=value)  # uint64 field 1: tag 0x08, then the varint
    expected = message.SerializeToString()
    assert b"\x08" + _wire.varint(value) == (expected or b"\x08\x00")


@pytest.mark.parametrize("value", [-1, -2, INT64_MIN])
def test_negative_varint_is_ten_bytes_of_twos_complement(value: int) -> None:
    message = rpc.PutRequest(lease=value)  # int64 field 3: tag 0x18
    assert b"\x18" + _wire.varint(value) == message.SerializeToString()
    assert len(_wire.varint(value)) == 10


@settings(max_examples=400)
@given(key=keys, value=values, lease_id=int64s)
@example(key=b"", value=b"", lease_id=0)
@example(key="/registry-migrator/leases/repo/ünïcödé/☃".encode(), value=b"", lease_id=INT64_MAX)
def test_create_txn_bytes_equal_protobuf(key: bytes, value: bytes, lease_id: int) -> None:
    expected = rpc.TxnRequest(
        compare=[compare_created_at(key, 0)],
        success=[rpc.RequestOp(request_put=rpc.PutRequest(key=key, value=value, lease=lease_id))],
        failure=[rpc.RequestOp(request_range=rpc.RangeRequest(key=key))],
    ).SerializeToString()
    assert _wire.create_txn(key, value, lease_id) == expected


@settings(max_examples=400)
@given(key=keys, create_revision=int64s)
@example(key=b"", create_revision=0)
@example(key="/k/é".encode(), create_revision=INT64_MAX)
def test_delete_if_created_at_txn_bytes_equal_protobuf(key: bytes, create_revision: int) -> None:
    expected = rpc.TxnRequest(
        compare=[compare_created_at(key, create_revision)],
        success=[rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=key))],
    ).SerializeToString()
    assert _wire.delete_if_created_at_txn(key, create_revision) == expected


@settings(max_examples=400)
@given(guard_key=keys, create_revision=int64s, key=keys, value=values)
@example(guard_key=b"/g", create_revision=0, key=b"", value=b"")
def test_put_if_created_at_txn_bytes_equal_protobuf(
    guard_key: bytes, create_revision: int, key: bytes, value: bytes
) -> None:
    expected = rpc.TxnRequest(
        compare=[compare_created_at(guard_key, create_revision)],
        success=[rpc.RequestOp(request_put=rpc.PutRequest(key=key, value=value))],
    ).SerializeToString()
    assert _wire.put_if_created_at_txn(guard_key, create_revision, key, value) == expected


@settings(max_examples=400)
@given(
    key=keys,
    range_end=keys,
    limit=int64s,
    sort_order=st.sampled_from([0, _wire.SORT_ASCEND, _wire.SORT_DESCEND]),
    sort_target=st.sampled_from([0, 1, _wire.SORT_BY_CREATE, 3, 4]),
)
@example(key=b"/p/", range_end=b"/p0", limit=0, sort_order=1, sort_target=2)
def test_range_request_bytes_equal_protobuf(
    key: bytes, range_end: bytes, limit: int, sort_order: int, sort_target: int
) -> None:
    expected = rpc.RangeRequest(
        key=key, range_end=range_end, limit=limit, sort_order=sort_order, sort_target=sort_target
    ).SerializeToString()
    got = _wire.range_request(
        key, range_end, limit=limit, sort_order=sort_order, sort_target=sort_target
    )
    assert got == expected


def test_range_request_constants_are_protobufs() -> None:
    assert _wire.SORT_ASCEND == rpc.RangeRequest.ASCEND
    assert _wire.SORT_DESCEND == rpc.RangeRequest.DESCEND
    assert _wire.SORT_BY_CREATE == rpc.RangeRequest.CREATE


def test_encoded_request_parses_back_to_the_same_message() -> None:
    # The other direction: protobuf reads our bytes as the intended request.
    parsed = rpc.TxnRequest.FromString(_wire.create_txn(b"/a/\xc3\xa9", b"v", 42))
    assert parsed.compare[0].WhichOneof("target_union") == "create_revision"
    assert parsed.compare[0].create_revision == 0
    assert parsed.compare[0].target == rpc.Compare.CREATE
    assert parsed.success[0].request_put.lease == 42
    assert parsed.failure[0].request_range.key == b"/a/\xc3\xa9"


# -- decoding ------------------------------------------------------------------------------

headers = st.builds(
    rpc.ResponseHeader,
    cluster_id=st.integers(0, UINT64_MAX),
    member_id=st.integers(0, UINT64_MAX),
    revision=int64s,
    raft_term=st.integers(0, UINT64_MAX),
)
key_values = st.builds(
    kv_pb2.KeyValue,
    key=keys,
    create_revision=int64s,
    mod_revision=int64s,
    version=int64s,
    value=values,
    lease=int64s,
)
response_ops = st.one_of(
    st.builds(
        lambda header, kvs, count, more: rpc.ResponseOp(
            response_range=rpc.RangeResponse(header=header, kvs=kvs, count=count, more=more)
        ),
        headers,
        st.lists(key_values, max_size=3),
        int64s,
        st.booleans(),
    ),
    st.builds(lambda header: rpc.ResponseOp(response_put=rpc.PutResponse(header=header)), headers),
    st.builds(
        lambda header, deleted: rpc.ResponseOp(
            response_delete_range=rpc.DeleteRangeResponse(header=header, deleted=deleted)
        ),
        headers,
        int64s,
    ),
    st.just(rpc.ResponseOp()),  # no oneof member set
)
txn_responses = st.builds(
    lambda header, has_header, succeeded, responses: rpc.TxnResponse(
        header=header if has_header else None, succeeded=succeeded, responses=responses
    ),
    headers,
    st.booleans(),
    st.booleans(),
    st.lists(response_ops, max_size=3),
)


def expected_reply(message: rpc.TxnResponse) -> _wire.TxnReply:
    """What EtcdClient read from the parsed message before the hand decoder."""
    kvs = message.responses[-1].response_range.kvs if message.responses else []
    return _wire.TxnReply(
        succeeded=bool(message.succeeded),
        revision=message.header.revision,
        range_kvs=wire_kvs(kvs),
    )


def wire_kvs(kvs: Iterable[kv_pb2.KeyValue]) -> list[_wire.WireKeyValue]:
    """What the hand decoder must read of protobuf's parsed key-values."""
    return [
        _wire.WireKeyValue(
            key=kv.key,
            create_revision=kv.create_revision,
            mod_revision=kv.mod_revision,
            value=kv.value,
            lease=kv.lease,
        )
        for kv in kvs
    ]


@settings(max_examples=400)
@given(message=txn_responses)
def test_decode_txn_response_equals_protobuf(message: rpc.TxnResponse) -> None:
    data = message.SerializeToString()
    parsed = rpc.TxnResponse.FromString(data)
    assert _wire.decode_txn_response(data) == expected_reply(parsed)


unknown_fields = st.sampled_from(
    [
        b"\xf8\x06\x05",  # field 111, varint
        b"\xf9\x06" + bytes(8),  # field 111, fixed64
        b"\xfd\x06" + bytes(4),  # field 111, fixed32
        b"\xfa\x06\x03abc",  # field 111, length-delimited
        b"\x12\x01x",  # field 2 (succeeded) with the wrong wire type: unknown to protobuf
    ]
)


@settings(max_examples=200)
@given(message=txn_responses, extra=st.lists(unknown_fields, max_size=3), at_end=st.booleans())
def test_decode_skips_unknown_fields_as_protobuf_does(
    message: rpc.TxnResponse, extra: list[bytes], at_end: bool
) -> None:
    data = message.SerializeToString()
    data = data + b"".join(extra) if at_end else b"".join(extra) + data
    assert _wire.decode_txn_response(data) == expected_reply(rpc.TxnResponse.FromString(data))


def test_decode_follows_protobuf_on_repeated_and_merged_fields() -> None:
    # Two headers merge (the revision of the last that has one), a later scalar wins, the
    # last ResponseOp counts, and two response_range members of one ResponseOp merge.
    kv1, kv2 = kv_pb2.KeyValue(key=b"a", create_revision=5), kv_pb2.KeyValue(key=b"b", lease=9)
    op = (
        rpc.ResponseOp(response_range=rpc.RangeResponse(kvs=[kv1])).SerializeToString()
        + rpc.ResponseOp(response_range=rpc.RangeResponse(kvs=[kv2])).SerializeToString()
    )
    data = (
        rpc.TxnResponse(header=rpc.ResponseHeader(revision=7), succeeded=True).SerializeToString()
        + rpc.TxnResponse(header=rpc.ResponseHeader(member_id=3)).SerializeToString()
        + b"\x10\x00"  # succeeded = false, after true
        + b"\x1a"
        + _wire.varint(len(op))
        + op
    )
    parsed = rpc.TxnResponse.FromString(data)
    assert parsed.header.revision == 7 and not parsed.succeeded
    assert len(parsed.responses[-1].response_range.kvs) == 2
    assert _wire.decode_txn_response(data) == expected_reply(parsed)


def test_a_later_oneof_member_replaces_response_range() -> None:
    range_op = rpc.ResponseOp(response_range=rpc.RangeResponse(kvs=[kv_pb2.KeyValue(key=b"a")]))
    put_op = rpc.ResponseOp(response_put=rpc.PutResponse())
    op = range_op.SerializeToString() + put_op.SerializeToString()
    data = b"\x1a" + _wire.varint(len(op)) + op
    parsed = rpc.TxnResponse.FromString(data)
    assert parsed.responses[0].WhichOneof("response") == "response_put"
    assert _wire.decode_txn_response(data).range_kvs == []


@pytest.mark.parametrize(
    "data",
    [
        b"\x08",  # tag, then no varint
        b"\x0a\x05ab",  # length 5, two bytes left
        b"\x08" + b"\xff" * 11,  # varint longer than ten bytes
        b"\x0b",  # wire type 3 (start group): not in proto3
        b"\x00\x00",  # field number 0
        b"\x09\x00\x00",  # fixed64 cut short
        b"\x1a\x03\x0a\x05x",  # a ResponseOp whose RangeResponse runs past its end
    ],
)
def test_malformed_answers_raise_value_error(data: bytes) -> None:
    with pytest.raises(ValueError):
        _wire.decode_txn_response(data)


@settings(max_examples=500)
@given(data=st.binary(max_size=64))
def test_decoder_never_fails_other_than_value_error(data: bytes) -> None:
    try:
        reply = _wire.decode_txn_response(data)
    except ValueError:
        return
    # Whatever it accepts, protobuf reads alike.
    assert reply == expected_reply(rpc.TxnResponse.FromString(data))


range_responses = st.builds(
    lambda header, has_header, kvs, count, more: rpc.RangeResponse(
        header=header if has_header else None, kvs=kvs, count=count, more=more
    ),
    headers,
    st.booleans(),
    st.lists(key_values, max_size=4),
    int64s,
    st.booleans(),
)


@settings(max_examples=300)
@given(
    message=range_responses,
    # Field 111 only: field 2 is RangeResponse.kvs, b"\x12\x01x" a kv protobuf cannot parse.
    extra=st.lists(unknown_fields.filter(lambda field: field[:1] != b"\x12"), max_size=2),
)
def test_decode_range_response_equals_protobuf(
    message: rpc.RangeResponse, extra: list[bytes]
) -> None:
    data = message.SerializeToString() + b"".join(extra)
    parsed = rpc.RangeResponse.FromString(data)
    assert _wire.decode_range_response(data) == wire_kvs(parsed.kvs)


@given(requests=st.lists(st.tuples(keys, values, int64s), min_size=1, max_size=5))
@settings(max_examples=50)
def test_nested_txn_bytes_equal_protobuf(requests: list[tuple[bytes, bytes, int]]) -> None:
    inner = [_wire.create_txn(k, v, lease) for k, v, lease in requests]
    expected = rpc.TxnRequest(
        success=[rpc.RequestOp(request_txn=rpc.TxnRequest.FromString(r)) for r in inner]
    )
    assert _wire.nested_txn(inner) == expected.SerializeToString()


def test_decode_nested_txn_response_gives_each_its_answer_at_the_outer_revision() -> None:
    held = kv_pb2.KeyValue(key=b"/k/busy", create_revision=7, mod_revision=7, value=b"h", lease=9)
    created = rpc.TxnResponse(
        succeeded=True, responses=[rpc.ResponseOp(response_put=rpc.PutResponse())]
    )
    busy = rpc.TxnResponse(
        succeeded=False, responses=[rpc.ResponseOp(response_range=rpc.RangeResponse(kvs=[held]))]
    )
    outer = rpc.TxnResponse(
        header=rpc.ResponseHeader(revision=42),
        succeeded=True,
        responses=[rpc.ResponseOp(response_txn=created), rpc.ResponseOp(response_txn=busy)],
    )
    first, second = _wire.decode_nested_txn_response(outer.SerializeToString())
    assert first == _wire.TxnReply(True, 42, [])
    assert second.succeeded is False and second.revision == 42
    assert second.range_kvs == [_wire.WireKeyValue(b"/k/busy", 7, 7, b"h", 9)]
