"""The gateway's pure parts, with no sockets: the body reader, the memory budget, bounded
gzip, the record-by-record protobuf parser and its caps, tokens and the policy."""

from __future__ import annotations

import gzip
import io
import time
from email.message import Message

import pytest

pytest.importorskip("opentelemetry.proto")

from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import (  # noqa: E402
    ExportLogsServiceRequest,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (  # noqa: E402
    ExportTraceServiceRequest,
)

from mixpanel_otel._body import BodyError, BodyTooLarge, read_body  # noqa: E402
from mixpanel_otel._exceptions import MixpanelException  # noqa: E402
from mixpanel_otel._wire import GroupUpdate  # noqa: E402
from mixpanel_otel.gateway._limits import Budget, Limits, gunzip, gzip_claim  # noqa: E402
from mixpanel_otel.gateway._otlp import LOGS, TRACES, BadRequest, TooLarge  # noqa: E402
from mixpanel_otel.gateway._protobuf import parse_request  # noqa: E402
from mixpanel_otel.gateway._security import (  # noqa: E402
    Policy,
    Tokens,
    loopback_host,
)


def _headers(**fields: str) -> Message:
    message = Message()
    for name, value in fields.items():
        message[name.replace("_", "-")] = value
    return message


class TestReadBody:
    def test_chunked_framing_is_counted_as_received_and_tiny_chunks_are_capped(self):
        chunks = b"2\r\nab\r\n" * 1000 + b"0\r\n\r\n"
        seen: list[int] = []
        raw = io.BufferedReader(io.BytesIO(chunks))
        body = read_body(raw, _headers(Transfer_Encoding="chunked"), 1 << 20, count=seen.append)
        assert body == b"ab" * 1000
        assert sum(seen) >= len(chunks) - 2  # framing too, not only the 2000 payload bytes
        too_many = b"1\r\na\r\n" * 5000 + b"0\r\n\r\n"
        with pytest.raises(BodyError, match="chunks"):
            read_body(
                io.BufferedReader(io.BytesIO(too_many)),
                _headers(Transfer_Encoding="chunked"),
                1 << 20,
            )

    @pytest.mark.parametrize(
        "fields",
        [
            [("Transfer-Encoding", "xchunked")],
            [("Transfer-Encoding", "chunked, gzip")],
            [("Transfer-Encoding", "chunked"), ("Transfer-Encoding", "chunked")],
            [("Transfer-Encoding", "chunked"), ("Content-Length", "5")],
            [("Content-Length", "5"), ("Content-Length", "6")],
            [("Content-Length", "\u00b9\u00b2\u00b3")],
            [("Content-Length", "\x1c5")],
            [("Content-Length", "+5")],
            [("Content-Length", "5 5")],
        ],
    )
    def test_ambiguous_framing_is_refused(self, fields):
        headers = Message()
        for name, value in fields:
            headers[name] = value
        with pytest.raises(BodyError):
            read_body(io.BufferedReader(io.BytesIO(b"hello" * 4)), headers, 100)

    def test_the_same_content_length_twice_is_one(self):
        headers = Message()
        headers["Content-Length"] = "5"
        headers["Content-Length"] = "5"
        assert read_body(io.BufferedReader(io.BytesIO(b"hello")), headers, 100) == b"hello"

    def test_chunked(self):
        raw = io.BufferedReader(io.BytesIO(b"3\r\nabc\r\n2;ext=1\r\nde\r\n0\r\nX-T: 1\r\n\r\n"))
        assert read_body(raw, _headers(Transfer_Encoding="chunked"), 100) == b"abcde"

    @pytest.mark.parametrize("size", [b"-1", b"-2", b"0x10", b"", b"g", b"1" * 16])
    def test_a_chunk_size_that_is_not_plain_hex_is_malformed(self, size):
        raw = io.BufferedReader(io.BytesIO(size + b"\r\n" + b"\0" * 64))
        with pytest.raises(BodyError, match="chunk"):
            read_body(raw, _headers(Transfer_Encoding="chunked"), 1 << 20)

    def test_the_running_total_is_checked_before_each_chunk_is_read(self):
        raw = io.BufferedReader(io.BytesIO(b"8\r\n12345678\r\n8\r\n"))
        with pytest.raises(BodyTooLarge):
            read_body(raw, _headers(Transfer_Encoding="chunked"), 10)

    @pytest.mark.parametrize("length", ["-1", "1e3", " ", "0x10"])
    def test_a_bad_content_length_is_malformed(self, length):
        with pytest.raises(BodyError, match="Content-Length"):
            read_body(io.BufferedReader(io.BytesIO(b"")), _headers(Content_Length=length), 10)

    def test_a_body_shorter_than_declared(self):
        with pytest.raises(BodyError, match="ended early"):
            read_body(io.BufferedReader(io.BytesIO(b"ab")), _headers(Content_Length="5"), 10)

    def test_every_piece_is_counted(self):
        seen: list[int] = []
        raw = io.BufferedReader(io.BytesIO(b"x" * 10))
        assert read_body(raw, _headers(Content_Length="10"), 10, count=seen.append) == b"x" * 10
        assert sum(seen) == 10


class TestBudget:
    def test_reserves_up_to_capacity_first_come_first_served(self):
        budget = Budget(10)
        assert budget.acquire(6, time.monotonic(), "a")
        assert not budget.acquire(5, time.monotonic(), "b")  # no room, deadline passed
        assert budget.acquire(4, time.monotonic(), "b")
        assert not budget.try_acquire(1)
        budget.release(6, "a")
        assert budget.try_acquire(6)
        assert budget.used == 10
        assert not budget.acquire(11, time.monotonic() + 60)  # never fits: no wait

    def test_a_caller_holding_its_share_waits_and_others_pass_it(self):
        import threading

        budget = Budget(100, per_peer=1)
        assert budget.acquire(10, time.monotonic(), "attacker")
        granted: list[str] = []

        def wait(peer: str) -> None:
            if budget.acquire(10, time.monotonic() + 60, peer):
                granted.append(peer)

        waiting = threading.Thread(target=wait, args=("attacker",))
        waiting.start()  # queued first, but its caller already holds its one reservation
        assert budget.acquire(10, time.monotonic(), "other")  # passes it, without waiting
        assert granted == []
        budget.release(10, "attacker")
        waiting.join(60)
        assert granted == ["attacker"]
        assert budget.grow(80) and not budget.grow(1)


class TestGunzip:
    def test_stops_at_the_limit_however_far_the_input_would_inflate(self):
        bomb = gzip.compress(b"\0" * (8 << 20))
        with pytest.raises(TooLarge):
            gunzip(bomb, 1 << 20)
        assert gzip_claim(bomb, 1 << 20) == (1 << 20) + 1

    def test_several_members_and_bad_input(self):
        assert gunzip(gzip.compress(b"ab") + gzip.compress(b"cd"), 10) == b"abcd"
        with pytest.raises(BadRequest, match="not valid gzip"):
            gunzip(b"not gzip at all!!!!", 10)
        with pytest.raises(BadRequest, match="truncated"):
            gunzip(gzip.compress(b"abc" * 100)[:-10], 1000)


def _logs(*attribute_counts: int) -> bytes:
    request = ExportLogsServiceRequest()
    scope = request.resource_logs.add().scope_logs.add()
    for count in attribute_counts:
        record = scope.log_records.add()
        for n in range(count):
            record.attributes.add(key=f"k{n}").value.int_value = n
    return request.SerializeToString()


class TestParseRequest:
    limits = Limits(max_request_bytes=1 << 20, max_records=5, max_attributes=4)

    def test_the_same_message_as_a_whole_parse(self):
        request = ExportTraceServiceRequest()
        resource = request.resource_spans.add(schema_url="s")
        resource.resource.attributes.add(key="service.name").value.string_value = "svc"
        scope = resource.scope_spans.add()
        scope.scope.name = "lib"
        span = scope.spans.add(name="op", trace_id=b"\1" * 16)
        span.attributes.add(key="a").value.array_value.values.add().string_value = "x"
        span.events.add(name="e").attributes.add(key="b").value.bool_value = True
        body = request.SerializeToString()
        parsed, removed, _ = parse_request(TRACES, body, self.limits)
        assert (parsed, removed) == (ExportTraceServiceRequest.FromString(body), 0)

    def test_a_record_over_a_cap_is_left_out_with_the_reason(self):
        parsed, removed, reasons = parse_request(LOGS, _logs(1, 5, 2), self.limits)
        counts = [len(r.attributes) for r in parsed.resource_logs[0].scope_logs[0].log_records]
        assert (counts, removed) == ([1, 2], 1)
        assert reasons == ["log record has 5 attributes (the limit is 4)"]

    def test_a_huge_record_is_counted_on_the_wire_and_never_parsed(self):
        record = b"\x32\x00" * 500_000  # a million bytes of empty attributes
        scope = b"\x12" + _varint(len(record)) + record
        resource = b"\x12" + _varint(len(scope)) + scope
        body = b"\x0a" + _varint(len(resource)) + resource
        parsed, removed, reasons = parse_request(LOGS, body, self.limits)
        # "more than 4": counted on the wire, stopping at the cap (parsed, it would say 500000)
        assert removed == 1 and reasons == ["log record has more than 4 attributes"]
        assert len(parsed.resource_logs[0].scope_logs[0].log_records) == 0

    def test_nested_values_count_against_the_record(self):
        request = ExportLogsServiceRequest()
        record = request.resource_logs.add().scope_logs.add().log_records.add()
        values = record.attributes.add(key="list").value.array_value.values
        for n in range(40):  # 41 values > 4 * 8
            values.add().int_value = n
        _, removed, reasons = parse_request(LOGS, request.SerializeToString(), self.limits)
        assert removed == 1 and "more than 32 attribute values" in reasons[0]

    def test_too_many_records_and_malformed_bodies_are_bad_requests(self):
        with pytest.raises(BadRequest, match="more than 5 logs records"):
            parse_request(LOGS, _logs(*[0] * 6), self.limits)
        for body in (b"\xff\xff\xff garbage", b"\x0a\x05ab", b"\x0b"):
            with pytest.raises(BadRequest, match="not a protobuf ExportLogsServiceRequest"):
                parse_request(LOGS, body, self.limits)


def _varint(number: int) -> bytes:
    out = bytearray()
    while True:
        byte, number = number & 0x7F, number >> 7
        out.append(byte | 0x80 if number else byte)
        if not number:
            return bytes(out)


class TestTokens:
    def test_bearer_tokens_from_a_file_and_inline(self, tmp_path):
        path = tmp_path / "tokens"
        path.write_text("# comment\n\nfrom-file\n")
        tokens = Tokens(str(path), "a, b")
        assert tokens.required
        for header in ("Bearer from-file", "bearer a", "Bearer  b "):
            assert tokens.allows(header), header
        for header in (None, "", "Bearer", "Bearer c", "Basic a", "from-file"):
            assert not tokens.allows(header), header
        path.write_text("rotated\n")
        assert tokens.reload() == 3
        assert tokens.allows("Bearer rotated") and not tokens.allows("Bearer from-file")

    def test_an_unreadable_or_empty_file_is_a_clear_error_and_no_tokens_means_open(self, tmp_path):
        with pytest.raises(MixpanelException, match="cannot read --auth-token-file"):
            Tokens(str(tmp_path / "missing"))
        (tmp_path / "empty").write_text("\n# nothing\n")
        with pytest.raises(MixpanelException, match="holds no token"):
            Tokens(str(tmp_path / "empty"))
        assert Tokens().allows(None) and not Tokens().required


class TestPolicy:
    def test_delete_is_off_by_default_and_all_restores_it(self):
        updates = [GroupUpdate("company", "a", op, {}, 0.0) for op in ("$set", "$delete")]
        kept, refused, reasons = Policy().split(updates)
        assert [u.op for u in kept] == ["$set"] and refused == 1
        assert reasons == ["$delete is not allowed (--allow-ops)"]
        assert Policy(["all"]).split(updates)[1] == 0
        assert Policy(["set", "$delete"]).split(updates)[1] == 0

    def test_group_keys_and_unknown_operations(self):
        updates = [GroupUpdate(key, "a", "$set", {}, 0.0) for key in ("company", "team")]
        kept, refused, reasons = Policy(group_keys=["company"]).split(updates)
        assert [u.group_key for u in kept] == ["company"] and refused == 1
        assert reasons == ["group key 'team' is not allowed (--group-keys)"]
        with pytest.raises(MixpanelException, match="unknown operation 'sett'"):
            Policy(["sett"])


@pytest.mark.parametrize(
    "host, loopback",
    [
        ("127.0.0.1:4318", True),
        ("localhost", True),
        ("[::1]:4318", True),
        ("127.5.5.5", True),
        ("evil.example:4318", False),
        ("10.0.0.1", False),
        ("", False),
        (None, False),
        ("[::1", False),
    ],
)
def test_loopback_host(host, loopback):
    assert loopback_host(host) is loopback
