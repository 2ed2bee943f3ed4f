"""HTTP to Mixpanel: one ``requests.Session``, responses sorted into outcomes."""

from __future__ import annotations

import email.utils
import time
from typing import Iterable, Optional
from urllib.parse import quote_plus

import requests

__all__ = ["Outcome", "Transport", "OK", "REJECTED", "RETRY", "FATAL", "form_body", "form_quote"]

OK = "ok"  # delivered
REJECTED = "rejected"  # status 0 or 413: split the batch, lose only the bad messages
RETRY = "retry"  # connection error, timeout, 408, 429, 5xx
FATAL = "fatal"  # 401, 403, other 4xx: not retried

_USER_AGENT = "mixpanel-otel/0.1"

# The official SDK posts ``data=<JSON array>&verbose=1&ip=0``, form-encoded by
# ``urllib.parse.quote_plus``. Messages are quoted one by one so a batch can be
# sized before it is joined.
BODY_OPEN = "data=%5B"
BODY_CLOSE = "%5D&verbose=1&ip=0"
SEPARATOR = "%2C"
_SAFE = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-~"
_FORM_TABLE = str.maketrans(
    {i: chr(i) if chr(i) in _SAFE else "+" if i == 32 else f"%{i:02X}" for i in range(128)}
)


def form_quote(text: str) -> str:
    """``quote_plus(text)``, twice as fast for the ASCII that ``json.dumps`` writes."""
    return text.translate(_FORM_TABLE) if text.isascii() else quote_plus(text)


def form_body(quoted: Iterable[str], extra: str = "") -> str:
    """The request body for already quoted messages."""
    return BODY_OPEN + SEPARATOR.join(quoted) + BODY_CLOSE + extra


class Outcome:
    __slots__ = ("kind", "reason", "retry_after", "reset")

    def __init__(
        self, kind: str, reason: str = "", retry_after: Optional[float] = None, reset: bool = False
    ) -> None:
        self.kind = kind
        self.reason = reason
        self.retry_after = retry_after
        self.reset = reset  # a connection reset: a quick first retry is fine

    def __repr__(self) -> str:
        return f"Outcome({self.kind!r}, {self.reason!r})"


def _retry_after(value: Optional[str]) -> Optional[float]:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _server_error(response: requests.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:200].strip() or response.reason or ""
    if isinstance(body, dict) and body.get("error"):
        return str(body["error"])
    return response.text[:200].strip()


def classify(response: requests.Response) -> Outcome:
    """Sort a response into OK / REJECTED / RETRY / FATAL with the server's reason."""
    status = response.status_code
    if status == 200:
        try:
            body = response.json()
        except ValueError:
            body = response.text.strip()
        if body == 1 or (isinstance(body, dict) and body.get("status") == 1):
            return Outcome(OK)
        reason = body.get("error") if isinstance(body, dict) else None
        return Outcome(REJECTED, str(reason or f"Mixpanel answered {response.text[:200]!r}"))
    reason = f"HTTP {status}: {_server_error(response)}"
    if status == 413:
        return Outcome(REJECTED, reason)
    if status in (408, 429) or status >= 500:
        return Outcome(RETRY, reason, _retry_after(response.headers.get("Retry-After")))
    if status in (401, 403):
        return Outcome(
            FATAL, f"{reason} (Mixpanel refused the project token or its permissions; not retried)"
        )
    return Outcome(FATAL, f"{reason} (not retried)")


class Transport:
    """Posts pre-encoded form bodies to ``base_url``; never raises."""

    def __init__(self, base_url: str, timeout: float, verify: bool = True) -> None:
        self.base_url = base_url
        self.timeout = timeout
        self.verify = verify
        self._session: Optional[requests.Session] = None

    def reset(self) -> None:
        """Drop the session (after fork the parent's sockets must not be shared)."""
        self._session = None

    def close(self) -> None:
        if self._session is not None:
            self._session.close()
            self._session = None

    def post(
        self,
        path: str,
        body: str,
        auth: Optional[tuple] = None,
        timeout: Optional[float] = None,
    ) -> Outcome:
        session = self._session
        if session is None:
            session = self._session = requests.Session()
            session.headers["User-Agent"] = _USER_AGENT
        try:
            response = session.post(
                self.base_url + path,
                data=body.encode("ascii"),
                headers={"Content-Type": "application/x-www-form-urlencoded"},
                auth=auth,
                timeout=timeout or self.timeout,
                verify=self.verify,
            )
        except requests.Timeout as exc:
            return Outcome(RETRY, f"timed out: {type(exc).__name__}")
        except requests.ConnectionError as exc:
            return Outcome(RETRY, f"connection failed: {_short(exc)}", reset=True)
        except requests.RequestException as exc:
            return Outcome(FATAL, f"request failed: {_short(exc)}")
        except Exception as exc:  # e.g. a bad proxy setting: report it, never raise
            return Outcome(FATAL, f"request failed: {type(exc).__name__}: {_short(exc)}")
        return classify(response)


def _short(exc: BaseException) -> str:
    text = str(exc)
    return text if len(text) <= 300 else text[:300] + "..."
