"""Loading server config: one YAML file validated by a pydantic model, plus environment overrides.

`load_config(Model, path, env_prefix)` reads the file (an empty file or no path = all defaults; a path
that cannot be read is a ConfigError), applies
variables such as `DFLY_DFDAEMON__UPLOAD__RATE_LIMIT_BYTES_PER_S=1000` (double underscore = nesting;
a text key takes the value as written or YAML-quoted, a list key a YAML flow list, one plain value or
nothing, any other value is read as YAML), then command-line flags (`flags={"seed_peer.enable": True}`),
validates the result once, and raises ConfigError with one line naming the key.
"""

from __future__ import annotations

import ipaddress
import os
import re
from pathlib import Path, PurePath
from types import UnionType
from typing import Annotated, Any, Literal, TypeVar, Union, get_args, get_origin

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, ValidationError, ValidationInfo, field_validator

from dfly.common.errors import ConfigError

MAX_DURATION_S = 366 * 86400.0  # a duration key (`*_s`) of a year or more is a typo, and overflows timers


class StrictModel(BaseModel):
    """Config sections reject unknown keys, so a typo is an error rather than a silent default; numbers
    are finite (no `.inf`, `.nan`), never `true` / `false` (YAML's `yes` for a port was port 1), and a
    duration (`*_s`) is at most MAX_DURATION_S. A section left empty (its keys all commented out, which
    YAML reads as null) has its defaults."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_booleans_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        field = cls.model_fields.get(info.field_name or "")
        if isinstance(value, bool) and field is not None and field.annotation in (int, float):
            raise ValueError(f"a number is needed, not {str(value).lower()}")
        if value is None and field is not None and _is_section(field.annotation):
            return {}  # `gc:` with every key commented out: the section's defaults
        return value

    @field_validator("*", mode="after")
    @classmethod
    def _bounded_durations(cls, value: Any, info: ValidationInfo) -> Any:
        name = info.field_name or ""
        if name.endswith("_s") and isinstance(value, float) and value > MAX_DURATION_S:
            raise ValueError(f"at most {MAX_DURATION_S:.0f} seconds (366 days)")
        return value


def _is_section(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _ip_address(value: str) -> str:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        raise ValueError(f"{value!r} is not an IP address") from None
    return value


def _ip_address_or_empty(value: str) -> str:
    return _ip_address(value) if value else value


IpAddress = Annotated[str, AfterValidator(_ip_address)]  # listen and advertise addresses: no host names
IpAddressOrEmpty = Annotated[str, AfterValidator(_ip_address_or_empty)]  # "" = chosen at start

LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


def _log_level(value: str) -> str:
    if value.lower() not in LOG_LEVELS:
        raise ValueError(f"{value!r} is not a log level ({', '.join(LOG_LEVELS)})")
    return value.lower()


LogLevel = Annotated[str, AfterValidator(_log_level)]

M = TypeVar("M", bound=BaseModel)


class DecimalInt(int):
    """An integer the YAML text wrote in plain decimal (no leading 0, 0x or 0o), so that a validator can
    tell `440` from `0440` (YAML reads the latter as octal); pydantic makes it a plain int."""


class _ConfigLoader(yaml.SafeLoader):
    """yaml.SafeLoader whose integers written in plain decimal come out as DecimalInt, and that refuses
    a key written twice in one mapping (plain YAML keeps the last silently: a pasted block could undo
    an earlier setting unseen). Keys a `<<` merge brings in may still be overridden, as YAML intends."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[tuple[str, str]] = set()
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = (key_node.tag, key_node.value)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key_node.value!r} appears twice in one mapping", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _construct_int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> int:
    value = loader.construct_yaml_int(node)
    return DecimalInt(value) if re.fullmatch(r"[-+]?[1-9][0-9_]*", node.value) else value


_ConfigLoader.add_constructor("tag:yaml.org,2002:int", _construct_int)


class _Unreadable(yaml.YAMLError):
    """YAML that parses but that Python cannot hold: nested thousands deep, a number of 4,300+ digits."""


def _yaml(text: str) -> Any:
    try:
        return yaml.load(text, Loader=_ConfigLoader)  # a SafeLoader subclass: no arbitrary objects
    except RecursionError:
        raise _Unreadable("nested too deeply") from None
    except ValueError as exc:  # int() of too many digits
        raise _Unreadable(str(exc).splitlines()[0]) from None


def _set(data: dict[str, Any], path: list[str], value: Any) -> None:
    node = data
    for key in path[:-1]:
        child = node.get(key)
        if not isinstance(child, dict):
            child = {}
            node[key] = child
        node = child
    node[path[-1]] = value


def _leaf_type(model: type[BaseModel], path: list[str]) -> Any:
    """The type of the key at `path` in `model` (Annotated and `| None` taken off), None if unknown."""
    annotation: Any = model
    for key in path:
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        field = annotation.model_fields.get(key)
        if field is None:
            return None
        annotation = field.annotation
        args = [a for a in get_args(annotation) if a is not type(None)]
        if get_origin(annotation) in (Union, UnionType) and len(args) == 1:
            annotation = args[0]
        if get_origin(annotation) is Annotated:
            annotation = get_args(annotation)[0]
    return annotation


def _is_text(leaf: Any) -> bool:
    if isinstance(leaf, type) and issubclass(leaf, str | PurePath):
        return True
    return get_origin(leaf) is Literal and all(isinstance(a, str) for a in get_args(leaf))


def _text(raw: str) -> str:
    """A text value as written, except: one written as a YAML quoted string ('…' or "…", as the file
    would have it) is unquoted, and one trailing newline (a secret mounted from a file) is dropped."""
    text = raw.removesuffix("\n").removesuffix("\r")
    quoted = text.strip()
    if len(quoted) >= 2 and quoted[0] == quoted[-1] and quoted[0] in "'\"":
        try:
            value = _yaml(quoted)
        except yaml.YAMLError:
            return text
        if isinstance(value, str):
            return value
    return text


def _env_value(model: type[BaseModel], path: list[str], raw: str) -> Any:
    """A variable's value for the key at `path`. A text key takes the text as written (YAML would read
    `::` as a mapping, `123456` as a number, `#x` as nothing; see `_text`). A list key takes a YAML flow
    list (`[a, b]`), nothing for an empty one, or one plain value as a list of it (also one that starts
    with a bracket but is no YAML list and has no comma); a flow list YAML cannot read is an error.
    Anything else is read as YAML."""
    leaf = _leaf_type(model, path)
    if _is_text(leaf):
        return _text(raw)
    if get_origin(leaf) in (list, tuple):
        if not raw.strip():
            return []  # VAR= clears the list (validators decide whether it may be empty)
        if not raw.lstrip().startswith("["):
            return [_text(raw)]
        try:
            return _yaml(raw)
        except yaml.YAMLError as exc:
            if "," not in raw:  # one value that starts with a bracket: `[::1]:8002`, `[0-9a-f]{64}`
                return [_text(raw)]
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise ConfigError(
                f"invalid config key {'.'.join(path)}: {problem} in the YAML list {raw!r} (quote the items, "
                "e.g. ['[::1]:8002', '10.0.0.2:8002'])"
            ) from None
    try:
        return _yaml(raw)
    except yaml.YAMLError:
        return raw


def _apply_env(
    data: dict[str, Any], model: type[BaseModel], env_prefix: str, environ: dict[str, str]
) -> None:
    prefix = env_prefix.upper() + "__"
    for name, raw in environ.items():
        if not name.upper().startswith(prefix):
            continue
        path = [p.lower() for p in name[len(prefix) :].split("__") if p]
        if path:
            _set(data, path, _env_value(model, path, raw))


def load_config(
    model: type[M],
    path: str | Path | None,
    env_prefix: str,
    environ: dict[str, str] | None = None,
    flags: dict[str, Any] | None = None,
) -> M:
    """The file, then environment variables over it, then command-line `flags` (dotted key -> value)
    over both; validated once, so a flag is checked against the rest of the config like any key."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None
        except UnicodeDecodeError as exc:
            raise ConfigError(f"config {path} is not UTF-8 text (byte {exc.start})") from None
        try:
            loaded = _yaml(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise ConfigError(f"config {path} is not valid YAML{where}: {problem}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config {path} must be a mapping at the top level")
        data = loaded or {}
    _apply_env(data, model, env_prefix, dict(os.environ) if environ is None else environ)
    for dotted, value in (flags or {}).items():
        _set(data, dotted.split("."), value)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        raise ConfigError(f"invalid config key {key}: {err['msg']}") from None
