"""Exceptions whose messages name the offending config key, item id, URL or file."""


class XstarsError(Exception):
    """Base class: every error raised on purpose by xstars."""


class ConfigError(XstarsError, ValueError):
    """The configuration is invalid; the message names the key and what is expected."""


class ServiceError(XstarsError, RuntimeError):
    """A remote service (STAC API, file server, WMS) failed after retries; names the URL."""


class DataError(XstarsError, RuntimeError):
    """A file or item does not contain what it should; names the file or item id."""
