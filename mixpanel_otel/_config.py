"""Configuration: argument, then environment, then default."""

from __future__ import annotations

import dataclasses
import difflib
import logging
import os
import threading
from typing import Any, Callable, Optional

from ._exceptions import ConfigurationError, MissingToken
from ._wire import DEFAULT_BATCH_SIZE, ENDPOINTS, MAX_BATCH_MESSAGES, REGION_HOSTS

__all__ = [
    "CONSUMER_OPTIONS",
    "Options",
    "base_url_of",
    "DISABLED_ENV",
    "check_arguments",
    "disabled_by_environment",
    "resolve_options",
    "resolve_target",
    "unknown_environment",
    "warn_unknown_environment",
]

#: ``true`` makes every front end a no-op (dev, CI); see :func:`disabled_by_environment`.
DISABLED_ENV = "MIXPANEL_OTEL_DISABLED"


def _positive_float(value: Any) -> float:
    number = float(value)
    if not number > 0 or number == float("inf"):
        raise ValueError("must be a positive number")
    return number


def _batch_size(value: Any) -> int:
    number = int(value)
    if not 1 <= number <= MAX_BATCH_MESSAGES:
        raise ValueError(f"must be between 1 and {MAX_BATCH_MESSAGES}")
    return number


def _positive_int(value: Any) -> int:
    number = int(value)
    if number < 1:
        raise ValueError("must be at least 1")
    return number


def _non_negative_float(value: Any) -> float:
    number = float(value)
    if not number >= 0 or number == float("inf"):
        raise ValueError("must be a number of seconds, 0 or more")
    return number


def _flag(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError("must be true or false")


def _callable_or_none(value: Any) -> Optional[Callable[..., Any]]:
    if value is None:
        return None
    if not callable(value):
        raise ValueError("must be callable")
    return value  # type: ignore[no-any-return]


def _credentials_or_none(value: Any) -> Any:
    """Service-account credentials for ``/import``, as the official SDK's ``Consumer`` takes."""
    if value is not None and not all(
        hasattr(value, name) for name in ("username", "secret", "project_id")
    ):
        raise ValueError("must have username, secret and project_id (ServiceAccountCredentials)")
    return value


def _path_or_none(value: Any) -> Optional[str]:
    return os.fspath(value) if value else None


# option -> (environment variable or None, default, parser)
CONSUMER_OPTIONS: dict[str, tuple[Optional[str], Any, Callable[[Any], Any]]] = {
    "flush_interval": ("MIXPANEL_OTEL_FLUSH_INTERVAL", 1.0, _positive_float),
    "batch_size": ("MIXPANEL_OTEL_BATCH_SIZE", DEFAULT_BATCH_SIZE, _batch_size),
    "max_pending": ("MIXPANEL_OTEL_MAX_PENDING", 10_000, _positive_int),
    "max_pending_bytes": ("MIXPANEL_OTEL_MAX_PENDING_BYTES", 64 * 1024 * 1024, _positive_int),
    "request_timeout": ("MIXPANEL_OTEL_TIMEOUT", 10.0, _positive_float),
    "shutdown_timeout": ("MIXPANEL_OTEL_SHUTDOWN_TIMEOUT", 5.0, _positive_float),
    "spool_dir": ("MIXPANEL_OTEL_SPOOL_DIR", None, _path_or_none),
    "max_block": ("MIXPANEL_OTEL_MAX_BLOCK", 5.0, _non_negative_float),
    "max_in_flight": ("MIXPANEL_OTEL_MAX_IN_FLIGHT", 8, _positive_int),
    "flush_on_sigterm": ("MIXPANEL_OTEL_FLUSH_ON_SIGTERM", True, _flag),
    "trait_interval": ("MIXPANEL_OTEL_TRAIT_INTERVAL", 60.0, _positive_float),
    "trait_state_dir": ("MIXPANEL_OTEL_TRAIT_STATE_DIR", None, _path_or_none),
    "trait_max_groups": ("MIXPANEL_OTEL_TRAIT_MAX_GROUPS", 100_000, _positive_int),
    "backoff_base": (None, 2.0, _positive_float),
    "backoff_max": (None, 60.0, _positive_float),
    "on_error": (None, None, _callable_or_none),
    "before_send": (None, None, _callable_or_none),
    "credentials": (None, None, _credentials_or_none),
}


@dataclasses.dataclass(frozen=True)
class Options:
    """Every consumer option, resolved (see :data:`CONSUMER_OPTIONS` and the README)."""

    flush_interval: float
    batch_size: int
    max_pending: int
    max_pending_bytes: int
    request_timeout: float
    shutdown_timeout: float
    spool_dir: Optional[str]
    max_block: float
    max_in_flight: int
    flush_on_sigterm: bool
    trait_interval: float
    trait_state_dir: Optional[str]
    trait_max_groups: int
    backoff_base: float
    backoff_max: float
    on_error: Optional[Callable[..., Any]]
    before_send: Optional[Callable[..., Any]]
    credentials: Any


def check_arguments(options: dict[str, Any]) -> dict[str, Any]:
    """Parse the options given as arguments (None means "not given"); raise naming
    the first that is wrong or unknown. The environment is not read."""
    unknown = set(options) - set(CONSUMER_OPTIONS) - {"region"}
    if unknown:
        named = [_with_suggestion(name, [*CONSUMER_OPTIONS, "region"]) for name in sorted(unknown)]
        raise ConfigurationError(f"unknown option(s): {', '.join(named)}")
    parsed: dict[str, Any] = {}
    for name, value in options.items():
        if value is not None and name in CONSUMER_OPTIONS:
            try:
                parsed[name] = CONSUMER_OPTIONS[name][2](value)
            except (TypeError, ValueError) as exc:
                raise ConfigurationError(f"{name}={value!r}: {exc}") from None
    return parsed


def resolve_options(options: dict[str, Any]) -> Options:
    """Fill every consumer option: argument, then environment, then default.

    Arguments are checked first, so a wrong argument is reported as such
    (``from_environment=False``) even when a variable is wrong too.
    """
    resolved = check_arguments(options)
    for name, (env, default, parse) in CONSUMER_OPTIONS.items():
        if name in resolved:
            continue
        value = os.environ.get(env) if env else None
        if not value:
            resolved[name] = default
            continue
        try:
            resolved[name] = parse(value)
        except (TypeError, ValueError) as exc:
            raise ConfigurationError(f"{env}={value!r}: {exc}", from_environment=True) from None
    return Options(**resolved)


def disabled_by_environment() -> bool:
    """True when ``MIXPANEL_OTEL_DISABLED`` says so; a value that is not a flag also
    disables (and raises, from the environment, so the front end reports it once)."""
    value = os.environ.get(DISABLED_ENV, "").strip()
    if not value:
        return False
    try:
        return _flag(value)
    except ValueError:
        raise ConfigurationError(
            f"{DISABLED_ENV}={value!r}: must be true or false", from_environment=True
        ) from None


def resolve_target(
    token: Optional[str], api_host: Optional[str], region: Optional[str] = None
) -> tuple[str, str]:
    """Return ``(token, base_url)``; ``api_host`` may be a host or a full URL
    (see :func:`base_url_of`).

    A missing token (``None`` or ``""`` and no ``MIXPANEL_TOKEN``) raises
    :class:`MissingToken`; a token that is not a string, or that has
    whitespace around it (a copy-paste slip Mixpanel would refuse), raises.
    """
    if token is not None and not isinstance(token, str):
        raise ConfigurationError(f"token must be a string, not {type(token).__name__}")
    if api_host is not None and not isinstance(api_host, str):
        raise ConfigurationError(f"api_host must be a string, not {type(api_host).__name__}")
    token_from_environment = not token
    token = token or os.environ.get("MIXPANEL_TOKEN", "")
    if not token.strip():
        raise MissingToken()
    if token != token.strip():
        name = "MIXPANEL_TOKEN" if token_from_environment else "token"
        raise ConfigurationError(
            f"{name} has whitespace around it; remove it (Mixpanel would refuse the token)",
            from_environment=token_from_environment,
        )
    host_from_environment = not api_host
    api_host = api_host or os.environ.get("MIXPANEL_API_HOST", "").strip()
    if not api_host:
        from_environment = not region
        region = (region or os.environ.get("MIXPANEL_REGION") or "us").strip().lower()
        if region not in REGION_HOSTS:
            name = "MIXPANEL_REGION" if from_environment else "region"
            raise ConfigurationError(
                f"{name}={region!r}: expected one of {', '.join(REGION_HOSTS)}",
                from_environment=from_environment,
            )
        return token, f"https://{REGION_HOSTS[region]}"
    try:
        return token, base_url_of(api_host)
    except ValueError as exc:
        name = "MIXPANEL_API_HOST" if host_from_environment else "api_host"
        raise ConfigurationError(
            f"{name}={api_host!r}: {exc}", from_environment=host_from_environment
        ) from None


_LOOPBACK = ("localhost", "127.0.0.1", "::1")


def base_url_of(api_host: str) -> str:
    """The base URL requests go to (``<base_url>/groups``), or ``ValueError`` saying why not.

    - a full URL keeps its scheme, which must be ``http`` or ``https``;
    - a bare ``host[:port]`` is ``https``, except on loopback (``localhost``,
      ``127.x.x.x``, ``[::1]``), where it is ``http``: the local sink speaks
      plain HTTP, and loopback traffic never leaves the machine;
    - a path is a prefix (a proxy at ``https://proxy.example/mixpanel``); a
      trailing endpoint (``/groups``, ``/engage``, ``/track``, ``/import``) is
      dropped, so a URL copied from Mixpanel's docs works: requests never
      go to ``/groups/groups``;
    - query strings, fragments, user names and spaces are refused.
    """
    from urllib.parse import urlsplit

    text = api_host.strip()
    if not text or any(c.isspace() for c in text):
        raise ValueError("must be a host name or URL with no spaces")
    if "://" not in text:
        host = urlsplit(f"//{text}").hostname or ""
        loopback = host in _LOOPBACK or host.startswith("127.")
        text = f"{'http' if loopback else 'https'}://{text}"
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https"):
        raise ValueError(
            f"scheme {parts.scheme!r} is not http or https (e.g. https://api.mixpanel.com)"
        )
    try:
        parts.port  # noqa: B018 - raises on a port that is not a number
    except ValueError:
        raise ValueError("the port is not a number from 0 to 65535") from None
    if not parts.hostname:
        raise ValueError("no host name")
    if parts.query or parts.fragment or "?" in text or "#" in text:
        raise ValueError("a query string or fragment does not belong in the API host")
    if parts.username is not None:
        raise ValueError("user names and passwords do not belong in the API host")
    path = parts.path.rstrip("/")
    for endpoint in ENDPOINTS.values():
        if path.endswith(endpoint):
            path = path[: -len(endpoint)]
            break
    return f"{parts.scheme}://{parts.netloc}{path.rstrip('/')}"


def _with_suggestion(name: str, known: list[str]) -> str:
    """``name``, and the closest known name when one is close: ``batchsize (did you mean
    batch_size?)``."""
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    return f"{name} (did you mean {close[0]}?)" if close else name


_ENV_PREFIX = "MIXPANEL_OTEL_"

#: Every ``MIXPANEL_OTEL_*`` variable the package reads: the consumer options' and these.
OTHER_ENV = (
    DISABLED_ENV,
    "MIXPANEL_OTEL_RULES",
    "MIXPANEL_OTEL_GATEWAY_HOST",
    "MIXPANEL_OTEL_GATEWAY_GRPC_PORT",
    "MIXPANEL_OTEL_GATEWAY_HTTP_PORT",
    "MIXPANEL_OTEL_GATEWAY_ACK_TIMEOUT",
    "MIXPANEL_OTEL_GATEWAY_TLS_CERT",
    "MIXPANEL_OTEL_GATEWAY_TLS_KEY",
    "MIXPANEL_OTEL_GATEWAY_TLS_CLIENT_CA",
    "MIXPANEL_OTEL_GATEWAY_AUTH_TOKENS",
    "MIXPANEL_OTEL_GATEWAY_AUTH_TOKEN_FILE",
    "MIXPANEL_OTEL_GATEWAY_ALLOW_OPS",
    "MIXPANEL_OTEL_GATEWAY_GROUP_KEYS",
    "MIXPANEL_OTEL_GATEWAY_ALLOWED_HOSTS",
    "MIXPANEL_OTEL_GATEWAY_DEDUPE_WINDOW",
    "MIXPANEL_OTEL_GATEWAY_HEALTH_SOCKET",
)


def known_environment() -> list[str]:
    """The ``MIXPANEL_OTEL_*`` variables the package reads."""
    return [*(env for env, _, _ in CONSUMER_OPTIONS.values() if env), *OTHER_ENV]


def unknown_environment(environ: Optional[dict[str, str]] = None) -> list[str]:
    """Each ``MIXPANEL_OTEL_*`` variable set that the package does not read (a typo is
    ignored), with the closest known name: ``MIXPANEL_OTEL_BATCHSIZE (did you mean
    MIXPANEL_OTEL_BATCH_SIZE?)``."""
    names = os.environ if environ is None else environ
    known = known_environment()
    return [
        _with_suggestion(name, known)
        for name in sorted(names)
        if name.startswith(_ENV_PREFIX) and name not in known
    ]


_warned_environment = threading.Event()


def warn_unknown_environment() -> None:
    """Warn once per process about the ``MIXPANEL_OTEL_*`` variables nothing reads."""
    if _warned_environment.is_set():
        return
    _warned_environment.set()
    unknown = unknown_environment()
    if unknown:
        logging.getLogger("mixpanel_otel").warning(
            "mixpanel-otel: ignored unknown environment variable(s): %s", "; ".join(unknown)
        )
