"""What makes the annotator safe to expose: token strength, the Host allow-list, body limits and rate limits.

- Without a token the annotator trusts whoever can reach it, which is only safe on this machine. A web page
  elsewhere can still reach 127.0.0.1 by rebinding its own DNS name to it, so the Host header must be a name
  this server answers to (the browser sends the attacker's name there, and cannot forge it).
- Bodies are refused from their declared length before anything is read, and streamed ones as soon as they pass
  the limit, so a few large uploads cannot fill the server's memory.
- Annotator names are not authenticated, so limits per name stop a runaway page or script, not a determined
  holder of the token.
"""

from __future__ import annotations

import ipaddress
import math
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterable

from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from pixelpick.errors import AnnotatorConfigError

TOKEN_ENV = "PIXELPICK_ANNOTATOR_TOKEN"
MIN_TOKEN_LENGTH = 16
MIN_TOKEN_BITS = 128  # what a guesser must search; a generated token has 192
LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")
WILDCARD_HOSTS = ("0.0.0.0", "::")
DEFAULT_MAX_BODY_BYTES = 64 * 1024  # the page's largest body is well under 1 KiB
DEFAULT_RATE_LIMIT = 20.0  # requests per second per annotator; a person labels about one pixel per second
DEFAULT_MAX_HELD = 32  # unlabelled pixels one name may hold; the page keeps about 6 ahead of the one shown
BURST_SECONDS = 3.0  # a name may save up this many seconds' worth of requests, e.g. for a page's catch-up
# A Host header is a DNS name or an IPv4 address, or an IPv6 address in brackets, then an optional port.
_HOST_HEADER = re.compile(r"(?:\[(?P<ipv6>[0-9a-fA-F:.]+)\]|(?P<name>[A-Za-z0-9._-]+))(?::\d{1,5})?")


def is_loopback(host: str) -> bool:
    """Whether `host` (an address or name to bind to) is reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def choose_token(host: str, token: str | None) -> tuple[str | None, bool]:
    """The access token to serve on `host` with, and whether it was generated here.

    On a loopback address a token is optional. Anywhere else it must be at least MIN_TOKEN_LENGTH characters and
    hold an estimated MIN_TOKEN_BITS of entropy (`token_bits`); without one, a strong one is generated. A token
    that is blank or padded with whitespace is refused (HTTP strips header values, so it could never match):
    AnnotatorConfigError says which rule it breaks.
    """
    if token == "":  # an empty environment variable means "not set"
        token = None
    if token is not None and (not token.strip() or token != token.strip()):
        raise AnnotatorConfigError(
            "the access token is blank or starts or ends with whitespace; give one without surrounding spaces"
        )
    if is_loopback(host):
        return token, False
    if token is None:
        return secrets.token_urlsafe(24), True  # 32 characters, 192 random bits
    if len(token) < MIN_TOKEN_LENGTH:
        raise AnnotatorConfigError(
            f"the access token is {len(token)} characters; serving on {host!r} needs at least {MIN_TOKEN_LENGTH} "
            f"(leave --token and ${TOKEN_ENV} unset to have a strong one generated)"
        )
    bits = token_bits(token)
    if bits < MIN_TOKEN_BITS:
        raise AnnotatorConfigError(
            f"the access token has about {bits:.0f} bits of entropy (estimated from its length, kinds of characters "
            f"and repeats); serving on {host!r} needs at least {MIN_TOKEN_BITS}: leave --token and ${TOKEN_ENV} "
            "unset to have one generated, or make one with `python -c 'import secrets; "
            "print(secrets.token_urlsafe(32))'`"
        )
    return token, False


def token_bits(token: str) -> float:
    """A cautious estimate of how many bits a guesser must search to find `token`.

    Each character is worth log2 of the alphabet its kinds of characters suggest (digits only: 10; hex: 16;
    letters, digits and symbols: up to 95), except characters a guesser would try first: a repeat of the previous
    one, the next step of a run (1234, abcd, 9753), and the end of a three-character sequence seen before
    (abcabc, passwordpassword). Random tokens lose almost nothing; typed ones lose most of their length.
    """
    digits = any(c.isdigit() for c in token)
    lower = "".join(sorted({c for c in token if c.islower()}))
    upper = "".join(sorted({c for c in token if c.isupper()}))
    others = any(not c.isalnum() for c in token)
    letters = set(lower.lower() + upper.lower())
    if not others and not (lower and upper) and letters and letters <= set("abcdef"):
        alphabet = 16  # hexadecimal
    else:
        alphabet = 10 * digits + 26 * bool(lower) + 26 * bool(upper) + 33 * others
    bits_per_character = math.log2(max(alphabet, 2))
    novel = 0
    for i, character in enumerate(token):
        repeat = i >= 1 and character == token[i - 1]
        run = i >= 2 and ord(character) - ord(token[i - 1]) == ord(token[i - 1]) - ord(token[i - 2])
        seen = i >= 2 and token[i - 2 : i + 1] in token[: i]
        novel += not (repeat or run or seen)
    return novel * bits_per_character


def host_name(header: str | None) -> str | None:
    """The lower-case host name or address of a Host header value (port and brackets removed), None if malformed.

    IPv6 addresses come in their compressed form, so every spelling of one address compares equal.
    """
    match = _HOST_HEADER.fullmatch(header or "")
    if match is None:
        return None
    if match["ipv6"] is None:
        return match["name"].lower()
    try:
        return str(ipaddress.IPv6Address(match["ipv6"]))
    except ValueError:
        return None


def allowed_host_names(extra: Iterable[str]) -> frozenset[str]:
    """The localhost names plus `extra` (names or addresses, a port or brackets allowed), as `host_name` gives them."""
    names = set(LOCAL_HOSTS)
    for value in extra:
        name = host_name(f"[{value}]" if value.count(":") > 1 and not value.startswith("[") else value)
        if name is None:
            raise AnnotatorConfigError(f"allowed host {value!r} is not a host name or address")
        names.add(name)
    return frozenset(names)


def _error(status: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


class HostAllowList:
    """Answer only requests whose Host header names this server: a defence against DNS rebinding.

    Starlette's TrustedHostMiddleware (1.10) does not serve here: it refuses with a plain-text 400 "Invalid host
    header" (the page expects JSON, and a 421 that names the host and the --allowed-host fix), and it compares IPv6
    literals as spelled, so `[FD00:0::5]` is refused where `fd00::5` is allowed.
    """

    def __init__(self, app: ASGIApp, allowed: frozenset[str]) -> None:
        self.app = app
        self.allowed = allowed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        header = Headers(scope=scope).get("host")
        name = host_name(header)
        if name is None:
            return await _error(400, f"the Host header {header!r} is missing or malformed")(scope, receive, send)
        if name not in self.allowed:
            detail = (
                f"this annotator does not answer to the host name {name!r} (it answers to "
                f"{', '.join(sorted(self.allowed))}); start it with --allowed-host {name} if that name is right"
            )
            return await _error(421, detail)(scope, receive, send)
        await self.app(scope, receive, send)


class DeclaredBodyLimit:
    """Refuse a request whose Content-Length exceeds `max_bytes` before a byte of its body is read.

    Bodies without a declared length are capped as they stream in by Starlette's RequestBodyLimitMiddleware.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            declared = Headers(scope=scope).get("content-length")
            if declared is not None and not declared.isdigit():
                return await _error(400, f"Content-Length {declared!r} is not a number")(scope, receive, send)
            if declared is not None and int(declared) > self.max_bytes:
                detail = body_too_large(self.max_bytes, int(declared))
                return await _error(413, detail, {"Connection": "close"})(scope, receive, send)
        await self.app(scope, receive, send)


def body_too_large(max_bytes: int, size: int | None = None) -> str:
    given = f" ({size} bytes)" if size is not None else ""
    return f"the request body{given} is larger than this annotator accepts ({max_bytes} bytes)"


class RateLimiter:
    """A token bucket per annotator name: `rate` requests per second on average, in bursts of up to `burst`."""

    MAX_NAMES = 10_000  # names seen are forgotten once their bucket is full again, beyond this many

    def __init__(self, rate: float, burst: int | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        if rate <= 0:
            raise AnnotatorConfigError(f"the rate limit must be a positive number of requests per second, got {rate}")
        self.rate = rate
        self.burst = burst if burst is not None else max(1, math.ceil(rate * BURST_SECONDS))
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # name -> (tokens, when counted)
        self._lock = threading.Lock()

    def wait(self, name: str) -> float:
        """0 when `name` may make a request now (it is counted), else the seconds until it may."""
        with self._lock:
            now = self._clock()
            if name not in self._buckets and len(self._buckets) >= self.MAX_NAMES:
                self._forget_idle(now)
            tokens, then = self._buckets.get(name, (self.burst, now))
            tokens = min(self.burst, tokens + (now - then) * self.rate)
            if tokens >= 1:
                self._buckets[name] = (tokens - 1, now)
                return 0.0
            self._buckets[name] = (tokens, now)
            return (1 - tokens) / self.rate

    def _forget_idle(self, now: float) -> None:
        for name, (tokens, then) in list(self._buckets.items()):
            if tokens + (now - then) * self.rate >= self.burst:
                del self._buckets[name]
