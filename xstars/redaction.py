"""No SAS token in any text xstars lets out: logs at every level, error lines, written files.

A signed Planetary Computer href carries its token as a query (``?st=...&se=...&sp=rl&sv=...
&sr=c&skoid=...&sig=...``). Such hrefs exist only inside :mod:`xstars.remote`, but the libraries
they are handed to name them in their own messages: rasterio's ``rasterio._base`` logs the
dataset name at DEBUG, and GDAL's errors name the file *without* a scheme (libtiff prefixes
its messages with the file's base name, ``B04.tif?st=...&sig=...: IReadBlock failed``), at
INFO through ``rasterio._err``, and inside exception texts.

So redaction does not look for URLs only. :func:`redact` removes:

* the query of every ``http(s)://`` URL (whatever it holds);
* any other query (``?...``, with or without a scheme before it) that carries an Azure SAS
  field (:data:`SAS_FIELDS`);
* a bare token (``st=...&se=...&sig=...``, as the token endpoint answers it);
* and, last, the value of any ``sig`` parameter, percent-encoded or not.

:func:`install` makes every log record go through it, whichever logger made it (child
loggers such as ``rasterio._base`` included) and whichever handler receives it: the record
factory redacts each record as it is created, its message formatted eagerly and its traceback
text too, and a filter on the root logger's handlers does it again for records made
otherwise (``logging.makeLogRecord``). The CLI redacts its one-line ``error:`` and the
traceback of a bug; Snakemake job logs are the commands' stderr, so they are covered too.
"""

from __future__ import annotations

import logging
import re

#: Query fields of Azure Shared Access Signatures (service, account and user delegation SAS).
SAS_FIELDS = frozenset({
    "sig", "se", "st", "sp", "sv", "sr", "si", "sip", "spr", "srt", "ss", "sdd", "ses",
    "skoid", "sktid", "skt", "ske", "sks", "skv", "saoid", "suoid", "scid",
    "rscc", "rscd", "rsce", "rscl", "rsct",
})

REDACTED = "<redacted>"

_URL_QUERY = re.compile(r"(https?://[^\s?'\"]+)\?[^\s'\"]*")
_ANY_QUERY = re.compile(r"\?([^\s'\"<>?]*)")
# Two or more name=value pairs joined by '&' (a query without its '?').
_PAIRS = re.compile(r"(?<![\w%.=&?/-])[A-Za-z_]+=[^\s&'\"]*(?:&[A-Za-z_]+=[^\s&'\"]*)+")
_NAMES = re.compile(r"(?:^|&)([A-Za-z_]+)=")
_SIG = re.compile(r"(?i)(?<![a-z])sig(=|%3D)(?:(?!%26)[^\s&'\"])+")


def _sas_names(query: str) -> set[str]:
    return {name.lower() for name in _NAMES.findall(query)} & SAS_FIELDS


def redact(text: str) -> str:
    """``text`` with every URL query, and every query or token carrying SAS fields, removed."""
    if "?" not in text and "=" not in text and "%3" not in text.upper():
        return text  # most log messages: nothing to look at
    text = _URL_QUERY.sub(rf"\1?{REDACTED}", text)
    text = _ANY_QUERY.sub(lambda m: f"?{REDACTED}" if _sas_names(m.group(1)) else m.group(0), text)
    text = _PAIRS.sub(lambda m: REDACTED if "sig" in (names := _sas_names(m.group(0))) or len(names) >= 2
                      else m.group(0), text)
    return _SIG.sub(rf"sig\1{REDACTED}", text)


def redact_record(record: logging.LogRecord) -> None:
    """Redact a log record in place: its message (formatted now), traceback and stack texts."""
    try:
        message = record.getMessage()
    except Exception:  # noqa: BLE001 - a bad format string: logging reports it later, with these arguments
        record.msg = redact(str(record.msg))
        record.args = tuple(redact(repr(arg)) for arg in record.args) if isinstance(record.args, tuple) else ()
        return
    record.msg, record.args = redact(message), ()
    if record.exc_info and not record.exc_text:
        record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
    elif record.exc_text:
        record.exc_text = redact(record.exc_text)
    if record.stack_info:
        record.stack_info = redact(record.stack_info)


class RedactingFilter(logging.Filter):
    """A handler filter: every record it passes is redacted (:func:`redact_record`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        redact_record(record)
        return True


def install() -> None:
    """Redact every log record of the process from now on; idempotent.

    The record factory covers every logger and every handler, those added later included
    (pytest's capture, a library's own); the root handlers get a :class:`RedactingFilter` too.
    """
    previous = logging.getLogRecordFactory()
    if not getattr(previous, "xstars_redacting", False):
        def factory(*args, **kwargs) -> logging.LogRecord:
            record = previous(*args, **kwargs)
            redact_record(record)
            return record

        factory.xstars_redacting = True  # type: ignore[attr-defined]
        logging.setLogRecordFactory(factory)
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())
