"""URIs as people see them (no user information, no query: nothing secret) and as the stores need them."""

from __future__ import annotations

from urllib.parse import parse_qsl, urlsplit

# SQLAlchemy 2.1 reads a bare postgresql:// as psycopg 3; lr-finder[server] installs psycopg2, so name it.
DEFAULT_PG_DRIVER = "postgresql+psycopg2"


def with_driver(uri: str) -> str:
    """A database URI with the driver lr-finder[server] installs named, where it names none."""
    return DEFAULT_PG_DRIVER + uri.removeprefix("postgresql") if urlsplit(uri).scheme == "postgresql" else uri


def where(uri: str) -> str:
    """A URI as shown to people: no user information and no query (libpq takes ?password=), so nothing secret."""
    scheme, sep, rest = uri.partition("://")
    return (scheme + sep + _split_userinfo(rest)[1]).split("?", 1)[0] if sep else uri.split("?", 1)[0]


def has_password(uri: str) -> bool:
    """Whether the URI carries a password, in its user information or in its query."""
    userinfo = _split_userinfo(uri.partition("://")[2])[0]
    return ":" in userinfo or any(key == "password" for key, _ in parse_qsl(urlsplit(uri).query))


def _split_userinfo(rest: str) -> tuple[str, str]:
    """What follows scheme:// -> (user information, the rest). It ends at the last @, since a raw password may hold
    / or @; sqlite:////abs/path has no authority, and its path may hold an @."""
    if rest.startswith("/") or "@" not in rest:
        return "", rest
    userinfo, _, tail = rest.rpartition("@")
    return userinfo, tail
