"""Mixpanel's ingestion protocol: request bodies, message validation, answers.

Pure functions with no I/O: the server hands a request's bytes here and
gets back messages, or the reason Mixpanel would refuse them. The limits are
Mixpanel's documented ones (see the design's "wire facts").
"""

from __future__ import annotations

import base64
import binascii
import codecs
import json
import zlib
from typing import Any, Optional, Union
from urllib.parse import unquote_plus, unquote_to_bytes

__all__ = [
    "ENDPOINTS",
    "GROUP_OPERATIONS",
    "MAX_BODY_BYTES",
    "MAX_MESSAGES",
    "MAX_MESSAGE_BYTES",
    "TOO_LARGE",
    "BadRequest",
    "Request",
    "answer",
    "check_group_message",
    "check_object",
    "decompress",
    "flag",
    "parse_body",
    "parse_form",
    "validate_group_message",
]

JSONDict = dict[str, Any]

#: Largest request body Mixpanel accepts, in bytes.
MAX_BODY_BYTES = 2 * 1024 * 1024
#: Most messages Mixpanel accepts in one request.
MAX_MESSAGES = 2000
#: Largest single message, in bytes of JSON.
MAX_MESSAGE_BYTES = 1024 * 1024
#: Longest property name, in characters.
MAX_NAME_CHARS = 255
#: Longest string value, in UTF-8 bytes.
MAX_STRING_BYTES = 255
#: Largest list or object value, in bytes of JSON.
MAX_CONTAINER_BYTES = 256 * 1024
#: Deepest nesting of objects in a property value.
MAX_OBJECT_DEPTH = 3

GROUP_OPERATIONS = ("$set", "$set_once", "$union", "$remove", "$unset", "$delete")
_OBJECT_OPERATIONS = frozenset(("$set", "$set_once", "$union", "$remove"))
#: URL path -> endpoint name.
ENDPOINTS = {"/groups": "groups", "/engage": "engage", "/track": "track", "/import": "import"}
_GZIP_ENDPOINTS = ("track", "import")  # Mixpanel takes no gzip on profile endpoints
TOO_LARGE = f"request exceeds max limit of {MAX_BODY_BYTES} bytes"

_SCALARS = frozenset((int, float, bool, type(None)))
_OPERATION_SET = frozenset(GROUP_OPERATIONS)
_MISSING: Any = object()


class BadRequest(Exception):
    """A request Mixpanel answers with status 0 as a whole (no message applied)."""


# --------------------------------------------------------------------------- validation


def _short(name: str, limit: int = 40) -> str:
    """A property name fit for an error message."""
    return repr(name if len(name) <= limit else name[:limit] + "...")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_value(value: Any) -> Optional[str]:
    """Why a property value breaks Mixpanel's limits, or None when it is fine."""
    kind = type(value)
    if kind is str:  # the common cases first, without the general walk
        if len(value) > MAX_STRING_BYTES // 4 and len(value.encode("utf-8")) > MAX_STRING_BYTES:
            return f"string longer than {MAX_STRING_BYTES} bytes"
        return None
    if kind in _SCALARS:
        return None
    if isinstance(value, (list, dict)):
        size = len(json.dumps(value, ensure_ascii=False).encode("utf-8"))
        if size > MAX_CONTAINER_BYTES:
            return f"list or object is {size} bytes (max {MAX_CONTAINER_BYTES})"
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:  # iterative: values may nest deeper than the recursion limit
        item, depth = stack.pop()
        if isinstance(item, str):
            if len(item) > MAX_STRING_BYTES // 4 and len(item.encode("utf-8")) > MAX_STRING_BYTES:
                return f"string longer than {MAX_STRING_BYTES} bytes"
        elif isinstance(item, list):
            stack.extend((v, depth) for v in item)
        elif isinstance(item, dict):
            if depth + 1 > MAX_OBJECT_DEPTH:
                return f"objects nested deeper than {MAX_OBJECT_DEPTH} levels"
            for key, v in item.items():
                if len(key) > MAX_NAME_CHARS:
                    return f"object key longer than {MAX_NAME_CHARS} characters"
                stack.append((v, depth + 1))
    return None


def check_group_message(message: Any) -> tuple[str, Optional[str]]:
    """``(operation, None)`` for a valid ``/groups`` message, else ``("", reason)``."""
    if type(message) is not dict:
        return "", "message must be a JSON object"
    token = message.get("$token", _MISSING)
    if type(token) is not str or not token:
        return "", "$token is missing" if token is _MISSING else "$token must be a non-empty string"
    group_key = message.get("$group_key", _MISSING)
    if type(group_key) is not str or not group_key:
        if group_key is _MISSING:
            return "", "$group_key is missing"
        return "", "$group_key must be a non-empty string"
    group_id = message.get("$group_id", _MISSING)
    if type(group_id) is not str and not _is_number(group_id):
        if group_id is _MISSING:
            return "", "$group_id is missing"
        return "", "$group_id must be a string or number"
    if group_id == "":
        return "", "$group_id must not be empty"
    when = message.get("$time", 0)
    if type(when) is not float and type(when) is not int and not _is_number(when):
        return "", "$time must be a number"
    ops = _OPERATION_SET.intersection(message)
    if len(ops) != 1:
        if not ops:
            return "", "no operation: expected exactly one of " + ", ".join(GROUP_OPERATIONS)
        named = ", ".join(op for op in GROUP_OPERATIONS if op in ops)
        return "", f"more than one operation ({named}): expected exactly one"
    op = next(iter(ops))
    payload = message[op]
    if op in _OBJECT_OPERATIONS:
        if type(payload) is not dict:
            return "", f"{op} must be an object"
        union = op == "$union"
        for name, value in payload.items():
            if len(name) > MAX_NAME_CHARS:
                return "", (
                    f"{op} property name {_short(name)} longer than {MAX_NAME_CHARS} characters"
                )
            kind = type(value)
            if union:
                if kind is not list:
                    return "", f"$union value for {_short(name)} must be a list"
            elif kind is str:  # the common cases inline, the rest in _check_value
                if len(value) <= MAX_STRING_BYTES // 4 or len(value.encode()) <= MAX_STRING_BYTES:
                    continue
            elif kind in _SCALARS:
                continue
            problem = _check_value(value)
            if problem:
                return "", f"{op} value for {_short(name)}: {problem}"
    elif op == "$unset":
        if type(payload) is not list or not payload:
            return "", "$unset must be a non-empty list of property names"
        for name in payload:
            if type(name) is not str:
                return "", "$unset must be a non-empty list of property names"
            if len(name) > MAX_NAME_CHARS:
                return "", (
                    f"$unset property name {_short(name)} longer than {MAX_NAME_CHARS} characters"
                )
    return op, None


def validate_group_message(message: Any) -> Optional[str]:
    """Why Mixpanel would reject a ``/groups`` message, or None if it is valid."""
    return check_group_message(message)[1]


def check_object(message: Any) -> tuple[str, Optional[str]]:
    """Validation for ``/engage``, ``/track`` and ``/import``: only 'a JSON object'."""
    if type(message) is dict:
        return "", None
    return "", "message must be a JSON object"


# --------------------------------------------------------------------------- bodies


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _loads(text: Union[str, bytes]) -> Any:
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


def _decode_data(text: str) -> tuple[Any, str]:
    """Parse a ``data=`` value: JSON, or base64-encoded JSON from old clients.

    Returns the value and the JSON text it was read from.
    """
    stripped = text.strip()
    if not stripped:
        raise BadRequest("data is empty")
    if stripped[0] in "[{":
        try:
            return _loads(stripped), stripped
        except ValueError as exc:
            raise BadRequest(f"data is not valid JSON: {exc}") from None
    try:
        return _loads(stripped), stripped
    except ValueError as json_error:
        raw = stripped.replace(" ", "+")  # '+' arrives as ' ' when not percent-encoded
        raw += "=" * (-len(raw) % 4)
        try:
            if "-" in raw or "_" in raw:
                decoded = base64.urlsafe_b64decode(raw.encode("ascii"))
            else:
                decoded = base64.b64decode(raw.encode("ascii"), validate=True)
            json_text = decoded.decode("utf-8")
            return _loads(json_text), json_text
        except (ValueError, binascii.Error, UnicodeError):
            raise BadRequest(
                f"data is neither JSON nor base64-encoded JSON: {json_error}"
            ) from None


def _percent_decode(raw: bytes) -> bytes:
    """``+`` and ``%XX`` decoding of one form value, at C speed for well-formed input.

    ``codecs.escape_decode`` turns ``\\xXX`` into a byte; every backslash of the
    input is doubled first, so only the escapes made here are read. A stray
    ``%`` (not followed by two hex digits) falls back to the stdlib, which
    keeps it as it is, as ``parse_qs`` does.
    """
    raw = raw.replace(b"+", b" ")
    if b"%" not in raw:
        return raw
    try:
        escaped = raw.replace(b"\\", b"\\\\").replace(b"%", b"\\x")
        decoded: Any = codecs.escape_decode(escaped)[0]  # bytes (typeshed for 3.9 says str)
        return bytes(decoded)
    except ValueError:
        return unquote_to_bytes(raw)


def parse_form(body: bytes) -> dict[str, bytes]:
    """Form fields, the first of each name, values percent-decoded but still bytes."""
    form: dict[str, bytes] = {}
    for field in body.split(b"&"):
        if not field:
            continue
        name, _, value = field.partition(b"=")
        key = unquote_plus(name.decode("latin-1"))
        if key not in form:
            form[key] = _percent_decode(value)
    return form


def _text(value: bytes, what: str) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest(f"{what} is not valid UTF-8") from None


def parse_body(body: bytes, content_type: str) -> tuple[Optional[Any], dict[str, str]]:
    """Return (parsed JSON payload or None when absent, form fields)."""
    return Request.parse(body, content_type).payload()


class Request:
    """A request body split into its parts; ``verbose`` is known before the data is parsed."""

    __slots__ = ("data", "form", "json_text", "raw_json")

    def __init__(
        self, form: dict[str, bytes], data: Optional[bytes], raw_json: Optional[bytes]
    ) -> None:
        self.form = form
        self.data = data  # the data= field, percent-decoded
        self.raw_json = raw_json  # a JSON body (by content type, or by its first byte)
        self.json_text: Optional[str] = None  # the JSON text the messages were read from

    @classmethod
    def parse(cls, body: bytes, content_type: str) -> Request:
        mime = content_type.split(";", 1)[0].strip().lower()
        if mime == "application/json" or mime.endswith("+json"):
            return cls({}, None, body)
        form = parse_form(body)
        if "data" in form:
            return cls(form, form["data"], None)
        if body.lstrip()[:1] in (b"[", b"{"):  # raw JSON sent without a JSON content type
            return cls({}, None, body)
        return cls(form, None, None)

    def field(self, name: str) -> Optional[str]:
        value = self.form.get(name)
        return None if value is None else value.decode("utf-8", "replace")

    def fields(self) -> dict[str, str]:
        return {name: _text(value, "body") for name, value in self.form.items()}

    def payload(self) -> tuple[Optional[Any], dict[str, str]]:
        """The parsed JSON (None when there is none) and the form's fields as text."""
        if self.raw_json is not None:
            try:
                text = self.raw_json.decode("utf-8-sig")
            except UnicodeDecodeError:
                raise BadRequest("body is not valid UTF-8") from None
            if not text.strip():
                raise BadRequest("no data: the JSON body is empty")
            try:
                value = _loads(text)
            except ValueError as exc:
                raise BadRequest(f"body is not valid JSON: {exc}") from None
            self.json_text = text
            return value, {}
        fields = self.fields()
        if self.data is not None:
            value, self.json_text = _decode_data(fields["data"])
            return value, fields
        return None, fields

    def messages(self) -> list[Any]:
        """The request's messages; raises :class:`BadRequest` for what Mixpanel refuses whole."""
        payload, _ = self.payload()
        if payload is None:
            raise BadRequest("no data: send data=<JSON array> or a JSON body")
        if type(payload) is dict:
            return [payload]
        if type(payload) is list:
            return payload
        raise BadRequest("data must be a JSON array of messages or a JSON object")

    def array_text(self) -> Optional[str]:
        """The messages as a JSON array text, as sent (after :meth:`messages`)."""
        text = self.json_text
        if text is None:
            return None
        text = text.strip()
        return text if text[:1] == "[" else "[" + text + "]"

    def data_text(self, limit: int = 2000) -> str:
        """The data as sent (clipped), to show beside a refusal."""
        raw = self.raw_json if self.raw_json is not None else self.data
        if raw is None:
            return ""
        return raw[:limit].decode("utf-8", "replace")


def decompress(body: bytes, endpoint: str, encoding: str) -> bytes:
    """Undo ``Content-Encoding``; refuse it where Mixpanel does, and past the size limit."""
    if encoding in ("", "identity"):
        return body
    if encoding not in ("gzip", "deflate"):
        raise BadRequest(f"unsupported Content-Encoding {encoding}")
    if endpoint not in _GZIP_ENDPOINTS:
        raise BadRequest(f"Content-Encoding {encoding} is not supported on /{endpoint}")
    try:
        inflater = zlib.decompressobj(zlib.MAX_WBITS | 32)  # gzip or zlib header
        data = inflater.decompress(body, MAX_BODY_BYTES * 5 + 1)
    except zlib.error as exc:
        raise BadRequest(f"body is not valid compressed data: {exc}") from None
    if len(data) > MAX_BODY_BYTES * 5:
        raise BadRequest("decompressed body is too large")
    return data


def flag(value: Optional[str]) -> bool:
    """A form or query flag such as ``verbose=1``."""
    return value is not None and value.strip().lower() in ("1", "true", "yes")


def answer(error: Optional[str], verbose: bool) -> tuple[bytes, str]:
    """Mixpanel's HTTP 200 answer: ``1``/``0``, or with verbose its JSON object."""
    if verbose:
        body = json.dumps({"status": 0 if error else 1, "error": error or None})
        return body.encode("utf-8"), "application/json"
    return (b"0" if error else b"1"), "text/plain; charset=utf-8"
