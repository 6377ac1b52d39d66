"""The demo gateway's SAS tokens: what the Planetary Computer's token endpoint hands out and what
Azure blob storage checks before it serves a byte.

``GET /api/sas/v1/token/<account>/<container>`` answers as the Planetary Computer's does::

    {"msft:expiry": "2026-12-02T14:00:00Z",
     "token": "st=...&se=...&sp=rl&sv=2021-06-08&sr=c&skoid=...&sig=..."}

(the SDK's ``planetary_computer.sas.SASToken`` reads exactly these two fields and appends the
token to an href as its query). The signature is an HMAC-SHA256, under a secret drawn when the
gateway process starts, of the account, the container, the start and expiry times and the
issuer's *generation*: a token opens only its own container, only until its expiry, only on the
gateway that issued it, and :meth:`TokenIssuer.expire_all` (``POST /_admin/tokens/expire``)
ends every token handed out so far, while the SDK, which trusts a token until 60 s before its
``msft:expiry``, still holds it: what a client sees when a token expires in the middle of a build.

:meth:`TokenIssuer.check` is the storage side: it names what is wrong with a request's query
(never echoing it) or returns None.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import threading
from datetime import UTC, datetime, timedelta
from urllib.parse import parse_qs, urlencode

#: Lifetime of a token when none is configured (``demo.token_ttl_s``).
DEFAULT_TTL_S = 3600

#: The storage service version the Planetary Computer's tokens name (``sv=``).
SERVICE_VERSION = "2021-06-08"

#: What Azure answers, with 403, to a request whose SAS token is missing, forged or expired.
AUTHENTICATION_FAILED = (
    '<?xml version="1.0" encoding="utf-8"?><Error><Code>AuthenticationFailed</Code>'
    "<Message>Server failed to authenticate the request. Make sure the value of Authorization header "
    "is formed correctly including the signature.</Message>"
    "<AuthenticationErrorDetail>{detail}</AuthenticationErrorDetail></Error>"
)


def _rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class TokenIssuer:
    """Issues and checks container SAS tokens for one gateway process. Thread-safe."""

    def __init__(self, ttl_s: int, secret: bytes | None = None) -> None:
        if ttl_s < 1:
            raise ValueError(f"token lifetime must be at least 1 s, got {ttl_s}")
        self.ttl_s = int(ttl_s)
        self._secret = secret or secrets.token_bytes(32)
        self._lock = threading.Lock()
        self._generation = 0
        self.issued = 0
        self.refused = 0

    def _signature(self, account: str, container: str, start: str, expiry: str, generation: int) -> str:
        message = "\n".join((account, container, start, expiry, str(generation))).encode()
        return base64.b64encode(hmac.new(self._secret, message, hashlib.sha256).digest()).decode()

    def issue(self, account: str, container: str, now: datetime | None = None) -> dict[str, str]:
        """A token for ``account/container`` valid ``ttl_s`` from now, as the token endpoint answers it."""
        now = (now or datetime.now(UTC)).replace(microsecond=0)
        start, expiry = _rfc3339(now), _rfc3339(now + timedelta(seconds=self.ttl_s))
        with self._lock:
            generation = self._generation
            self.issued += 1
        fields = {"st": start, "se": expiry, "sp": "rl", "sv": SERVICE_VERSION, "sr": "c",
                  "skoid": f"xstars-demo-{generation}",
                  "sig": self._signature(account, container, start, expiry, generation)}
        return {"msft:expiry": expiry, "token": urlencode(fields)}

    def expire_all(self) -> int:
        """End every token issued so far (they stop opening files at once); the new generation."""
        with self._lock:
            self._generation += 1
            return self._generation

    def check(self, account: str, container: str, query: str, now: datetime | None = None) -> str | None:
        """None if ``query`` holds a valid, unexpired token of this container; else why not.

        The reason is Azure's wording and never quotes the token.
        """
        fields = {key: values[0] for key, values in parse_qs(query, keep_blank_values=True).items()}
        problem = self._problem(account, container, fields, now or datetime.now(UTC))
        if problem is not None:
            with self._lock:
                self.refused += 1
        return problem

    def _problem(self, account: str, container: str, fields: dict[str, str], now: datetime) -> str | None:
        missing = [key for key in ("st", "se", "sp", "sv", "sr", "sig") if not fields.get(key)]
        if missing:
            return f"The request carries no shared access signature (missing {', '.join(missing)})."
        if fields["sr"] != "c" or "r" not in fields["sp"]:
            return "This request is not authorized to perform this operation using this permission."
        with self._lock:
            generation = self._generation
        expected = self._signature(account, container, fields["st"], fields["se"], generation)
        if not hmac.compare_digest(expected, fields["sig"]):
            return "Signature did not match."  # forged, another container's, or issued before expire_all
        try:
            start = datetime.strptime(fields["st"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
            expiry = datetime.strptime(fields["se"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
        except ValueError:
            return "Signed start or expiry time is not a valid time."
        if not start <= now < expiry:
            return (f"Signature not valid in the specified time frame: Start [{fields['st']}] - "
                    f"Expiry [{fields['se']}] - Current [{_rfc3339(now)}]")
        return None


def authentication_failed(detail: str) -> bytes:
    """The XML body of Azure's 403 for ``detail`` (escaped)."""
    from xml.sax.saxutils import escape

    return AUTHENTICATION_FAILED.format(detail=escape(detail)).encode()
