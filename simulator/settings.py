"""Resolve the configuration once: explicit overrides (flags) > environment > `.env` > defaults."""

from __future__ import annotations

import getpass
import math
import os
import re
import sys
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any
from urllib.parse import quote_plus, unquote_plus

from simulator.errors import UserError
from simulator.quality.verdict import UsableRule, parse_limit

USABLE_LIMITS = ("empty", "truncated", "fallbacks", "role_breaks", "repeated", "leaked")

APP_NAME = "llm-simulator"

# Client libraries (openai, ollama) read these from the process environment themselves,
# so a value that only lives in `.env` has to be exported for them to see it.
EXPORTED_FROM_DOTENV = ("OPENAI_API_KEY", "OPENAI_BASE_URL", "OLLAMA_HOST")


def default_data_dir() -> Path:
    """The per-user data directory (embedded database, server log)."""
    home = Path.home()
    if sys.platform == "darwin":
        return home / "Library" / "Application Support" / APP_NAME
    xdg = os.environ.get("XDG_DATA_HOME", "")
    # The XDG spec says relative paths are invalid and must be ignored.
    base = Path(xdg) if xdg and Path(xdg).is_absolute() else home / ".local" / "share"
    return base / APP_NAME


def login_name() -> str:
    """The operating system's name for the current user."""
    try:
        return getpass.getuser()
    except Exception:  # no USER/LOGNAME and no passwd entry (some containers)
        return "unknown"


@dataclass(frozen=True, repr=False)
class Settings:
    """Every setting, resolved. Build it with `load_settings()`; `Settings()` is the defaults."""

    mongodb_uri: str | None = None
    mongodb_db: str = "simulator"
    data_dir: Path = field(default_factory=default_data_dir)
    user: str = field(default_factory=login_name)
    openai_api_key: str | None = None
    openai_base_url: str | None = None
    ollama_host: str | None = None
    log_dir: Path = field(default_factory=lambda: Path.cwd() / "logs")
    embedded_port: int = 0  # 0 = pick a free port
    db_timeout_ms: int = 5000
    prompts_dir: Path | None = None  # None = the templates shipped with the project
    concurrency: int | None = None  # None = the provider's default
    concurrency_start: int = 4  # requests in flight per endpoint at first; then it adapts
    retry_attempts: int = 5  # attempts per LLM call in all (retries = attempts - 1)
    retry_base_delay: float = 0.5  # seconds before the first retry; doubles each time
    retry_max_delay: float = 30.0  # cap on one wait; a longer Retry-After fails the call
    request_timeout: float = 120.0  # seconds one LLM request may take before it is retried
    # A worker silent for this long (seconds) gives up its batch's conversations to others.
    worker_timeout: float = 30.0
    prices: str | None = None  # SIMULATOR_PRICES, for --max-cost (see simulator/pricing.py)
    # Thresholds of the `usable` verdict (simulator/quality/verdict.py): a count ("0") or a
    # share ("10%" or "0.1") of the conversation's replies or messages.
    usable_max_empty: str = "0"
    usable_max_truncated: str = "10%"
    usable_max_fallbacks: str = "1"
    usable_max_role_breaks: str = "0"
    usable_max_repeated: str = "0"
    usable_max_leaked: str = "0"

    def usable_rule(self) -> UsableRule:
        """The `usable` rule these settings describe."""
        return UsableRule(
            **{
                f"max_{name}": parse_limit(getattr(self, f"usable_max_{name}"))
                for name in USABLE_LIMITS
            }
        )

    def __repr__(self) -> str:
        # repr is what ends up in logs and tracebacks: never show secrets.
        shown = []
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "mongodb_uri" and value:
                value = redact_uri(value)
            elif f.name == "openai_api_key" and value:
                value = "***"
            shown.append(f"{f.name}={value!r}")
        return f"Settings({', '.join(shown)})"


# --- the .env file -------------------------------------------------------------------------

_LINE = re.compile(r"^(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(.*)$")


def parse_dotenv(text: str, source: str = ".env") -> dict[str, str]:
    """Parse KEY=VALUE lines: optional `export `, quotes, `#` comments. Nothing is expanded."""
    values: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = _LINE.match(line)
        if not match:
            raise UserError(_malformed_line(source, number, line))
        key, value = match.group(1), match.group(2).strip()
        if value[:1] in ("'", '"'):
            quote = value[0]
            end = value.find(quote, 1)
            while quote == '"' and end > 0 and value[end - 1] == "\\":
                end = value.find(quote, end + 1)
            if end < 0:
                raise UserError(
                    f"{source} line {number}: the value of {key} has no closing {quote}."
                )
            value = value[1:end]
            if quote == '"':
                value = value.replace('\\"', '"').replace("\\n", "\n").replace("\\\\", "\\")
        else:
            # An unquoted value ends at " #", so "KEY=value # note" works; a bare "#" stays.
            value = re.split(r"\s+#", value, maxsplit=1)[0].strip()
        values[key] = value
    return values


_KEY_START = re.compile(r"^(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)\s*([:=]|\s|$)")


def _known_variables() -> set[str]:
    return {v for v, _ in _VARIABLES.values()} | {
        "DB_USER",
        "DB_PASSWORD",
        "DB_CLUSTER_URL",
        "SIMULATOR_ENV_FILE",
    }


def _malformed_line(source: str, number: int, line: str) -> str:
    """What is wrong with a `.env` line, never showing its value: it may be a password."""
    where = f"{source} line {number}"
    expected = "expected KEY=VALUE, e.g. MONGODB_DB=simulator"
    match = _KEY_START.match(line)
    # Name the key only when it looks like one: a bare word on a line of its own may be the
    # rest of a value (a password) that was split across lines.
    key = match.group(1) if match else None
    if key is not None and (key in _known_variables() or re.fullmatch(r"[A-Z][A-Z0-9]*_\w+", key)):
        separator = match.group(2) if match else ""
        found = {":": "a ':'", "": "nothing"}.get(separator, "a space")
        return (
            f"{where}: {expected}; after the key {key} there is {found} instead of '=' "
            f"(write {key}=VALUE; the value is not shown here as it may be a secret)."
        )
    return (
        f"{where}: {expected}; this line does not start with a setting name and '=' "
        "(a value with line breaks goes in double quotes with \\n; the line is not shown "
        "here as it may hold a secret)."
    )


def dotenv_path() -> Path:
    """$SIMULATOR_ENV_FILE, else `.env` in the current directory."""
    return Path(os.environ.get("SIMULATOR_ENV_FILE") or ".env")


def read_dotenv(path: Path | None = None) -> dict[str, str]:
    """The `.env` values, or {} when there is no such file."""
    path = path or dotenv_path()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except IsADirectoryError:
        raise UserError(
            f"{path} is a directory, not a settings file: point SIMULATOR_ENV_FILE at a "
            "KEY=VALUE file (see .env_template)."
        ) from None
    except OSError as e:
        raise UserError(f"Cannot read {path}: {e.strerror}.") from None
    except UnicodeDecodeError as e:
        line = text_line(path, e.start)
        raise UserError(
            f"{path} line {line} is not UTF-8 text: save the file as UTF-8 "
            "(KEY=VALUE lines, see .env_template)."
        ) from None
    return parse_dotenv(text, str(path))


def text_line(path: Path, offset: int) -> int:
    """The line number of byte `offset` in the file."""
    try:
        return path.read_bytes()[:offset].count(b"\n") + 1
    except OSError:
        return 0


# --- URIs ----------------------------------------------------------------------------------


def _split_uri(uri: str) -> tuple[str, str | None, str]:
    """(scheme://, userinfo or None, rest) — tolerant of unquoted '@' and '/' in passwords."""
    scheme, sep, rest = uri.partition("://")
    if not sep:
        return "", None, uri
    before_query, qmark, query = rest.partition("?")
    if "@" not in before_query:
        return scheme + sep, None, rest
    userinfo, _, hosts = before_query.rpartition("@")
    return scheme + sep, userinfo, hosts + qmark + query


def redact_uri(uri: str) -> str:
    """The URI with any password (in the user info or a `...password=` option) replaced by ***."""
    scheme, userinfo, rest = _split_uri(uri)
    if userinfo is not None:
        user, colon, _ = userinfo.partition(":")
        rest = f"{user}{':***' if colon else ''}@{rest}"
    rest = re.sub(r"(?i)([?&][^=&]*(?:password|secret)[^=&]*=)[^&]*", r"\1***", rest)
    return scheme + rest


def uri_user(uri: str) -> str | None:
    """The (unquoted) user name in a URI, if any."""
    _, userinfo, _ = _split_uri(uri)
    return unquote_plus(userinfo.partition(":")[0]) if userinfo else None


def scrub_password(text: str, uri: str) -> str:
    """`text` (say, a driver's error message) with the URI's password, raw or quoted, as ***."""
    _, userinfo, _ = _split_uri(uri)
    secret = userinfo.partition(":")[2] if userinfo else ""
    for form in {secret, unquote_plus(secret)} - {""}:
        text = text.replace(form, "***")
    return text


def uri_hosts(uri: str) -> str:
    """The host part of a URI (host:port[,host:port] or an SRV name), without credentials."""
    _, _, rest = _split_uri(uri)
    return re.split(r"[/?]", rest, maxsplit=1)[0]


def build_uri(user: str | None, password: str | None, cluster: str) -> str:
    """A URI from the prototype's DB_USER / DB_PASSWORD / DB_CLUSTER_URL."""
    if "://" in cluster:
        scheme, _, cluster = cluster.partition("://")
        scheme += "://"
    elif re.match(r"^(localhost|127\.0\.0\.1|\[::1\])(:|/|$)", cluster) or re.match(
        r"^[^/:]+:\d+(,|/|$)", cluster
    ):
        scheme = "mongodb://"  # a plain host:port is a direct server, not an Atlas SRV name
    else:
        scheme = "mongodb+srv://"
    credentials = ""
    if user:
        credentials = quote_plus(user)
        if password:
            credentials += ":" + quote_plus(password)
        credentials += "@"
    return f"{scheme}{credentials}{cluster}{'' if '/' in cluster else '/'}"


# --- resolution ----------------------------------------------------------------------------

# Settings field -> (variable, type). DB_USER/DB_PASSWORD/DB_CLUSTER_URL are handled apart.
_VARIABLES: dict[str, tuple[str, type]] = {
    "mongodb_uri": ("MONGODB_URI", str),
    "mongodb_db": ("MONGODB_DB", str),
    "data_dir": ("SIMULATOR_DATA_DIR", Path),
    "user": ("SIMULATOR_USER", str),
    "openai_api_key": ("OPENAI_API_KEY", str),
    "openai_base_url": ("OPENAI_BASE_URL", str),
    "ollama_host": ("OLLAMA_HOST", str),
    "log_dir": ("SIMULATOR_LOG_DIR", Path),
    "embedded_port": ("SIMULATOR_DB_PORT", int),
    "db_timeout_ms": ("SIMULATOR_DB_TIMEOUT_MS", int),
    "prompts_dir": ("SIMULATOR_PROMPTS_DIR", Path),
    "concurrency": ("SIMULATOR_CONCURRENCY", int),
    "concurrency_start": ("SIMULATOR_CONCURRENCY_START", int),
    "retry_attempts": ("SIMULATOR_RETRY_ATTEMPTS", int),
    "retry_base_delay": ("SIMULATOR_RETRY_BASE_DELAY", float),
    "retry_max_delay": ("SIMULATOR_RETRY_MAX_DELAY", float),
    "request_timeout": ("SIMULATOR_REQUEST_TIMEOUT", float),
    "worker_timeout": ("SIMULATOR_WORKER_TIMEOUT", float),
    "prices": ("SIMULATOR_PRICES", str),
    **{f"usable_max_{n}": (f"SIMULATOR_USABLE_MAX_{n.upper()}", str) for n in USABLE_LIMITS},
}
_MINIMUM = {
    "embedded_port": 0,
    "db_timeout_ms": 1,
    "concurrency": 1,
    "concurrency_start": 1,
    "retry_attempts": 1,
    "retry_base_delay": 0,
    "retry_max_delay": 0,
    "request_timeout": 0.001,
    "worker_timeout": 0.1,
}


_MAXIMUM = {"embedded_port": 65535}


def _convert(name: str, value: object, where: str = "") -> object:
    """The value of one setting, checked. `where` says where it was set, for the error."""
    variable, kind = _VARIABLES[name]
    if kind is Path:
        # Made absolute now: the setting must not change meaning if the cwd changes later.
        return Path(str(value)).expanduser().absolute()
    if kind in (int, float):
        what = "a whole number" if kind is int else "a number"
        try:
            number = kind(str(value).strip())
        except ValueError:
            raise UserError(f"{variable} must be {what}, got {value!r}{where}.") from None
        if not math.isfinite(number):
            raise UserError(f"{variable} must be a finite number, got {value!r}{where}.")
        if number < _MINIMUM[name]:
            raise UserError(f"{variable} must be at least {_MINIMUM[name]}, got {number}{where}.")
        if name in _MAXIMUM and number > _MAXIMUM[name]:
            raise UserError(f"{variable} must be at most {_MAXIMUM[name]}, got {number}{where}.")
        return number
    if name.startswith("usable_max_"):
        parse_limit(str(value), f"{variable}{where}")  # checked now, not mid-batch
        return str(value).strip()
    if name == "mongodb_db" and (not str(value) or re.search(r'[/\\. "$\x00]', str(value))):
        raise UserError(
            f"MONGODB_DB {value!r}{where} is not a valid database name: use letters, digits, "
            "_ or -."
        )
    return value


def load_settings(**overrides: object) -> Settings:
    """Resolve every setting. `overrides` are field names (flags); None means "not given"."""
    unknown = set(overrides) - set(_VARIABLES)
    if unknown:
        raise TypeError(f"load_settings() got unknown setting(s): {sorted(unknown)}")
    dotenv = read_dotenv()
    for key in EXPORTED_FROM_DOTENV:
        if dotenv.get(key) and key not in os.environ:
            os.environ[key] = dotenv[key]

    def get(variable: str) -> str | None:
        # The first layer that has the variable decides, so `MONGODB_URI=` in the
        # environment switches off a URI in .env. Empty means unset.
        for layer in (os.environ, dotenv):
            if variable in layer:
                return layer[variable] or None
        return None

    def where(name: str, variable: str) -> str:
        if overrides.get(name) is not None:
            return " (given on the command line)"
        if variable in os.environ:
            return " (set in the environment)"
        return f" (set in {dotenv_path()})"

    values: dict[str, Any] = {}
    for name, (variable, _) in _VARIABLES.items():
        value = overrides.get(name)
        value = get(variable) if value is None else value
        if name == "mongodb_uri" and value is None and get("DB_CLUSTER_URL"):
            value = build_uri(get("DB_USER"), get("DB_PASSWORD"), get("DB_CLUSTER_URL") or "")
        if value is not None:
            values[name] = _convert(name, value, where(name, variable))
    return replace(Settings(), **values)
