"""Layered, typed configuration: dataclass schema <- base YAML <- env YAML(s) <- CLI ``key=value``.

Built on OmegaConf structured configs, which give YAML merging, dotted overrides and type checks.
This module adds what OmegaConf leaves to the caller:

* every error names the offending key, where it came from (which YAML or the command line) and
  lists the valid keys at that level;
* ``help_text`` renders every field with its type (or its choices), default and one-line doc
  (``--help``);
* ``save_config`` writes the resolved config to the run directory.

The dataclasses are the only place a default is written (the recipes' ``base.yaml`` files set no
key; env YAMLs set only what differs). Fields document themselves with :func:`doc`; a field with a
fixed set of values is typed with a :class:`Choice` enum, so a wrong value fails while loading with
the valid ones listed::

    class Schedule(Choice):
        constant = "constant"
        cosine = "cosine"

    @dataclass
    class PPOConfig:
        lr: float = doc(3e-4, "Adam learning rate.")
        lr_schedule: Schedule = doc(Schedule.constant, "Learning-rate schedule.")
"""
from __future__ import annotations

import contextlib
import dataclasses
import enum
import os
import typing
from pathlib import Path
from typing import Any, Iterator, Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

__all__ = ["Choice", "ConfigError", "config_errors", "check_ranges", "doc", "load_config", "help_text", "save_config",
           "to_object", "valid_keys"]


class ConfigError(ValueError):
    """A config file or override is invalid (unknown key, wrong type, bad syntax, missing file)."""


class Choice(str, enum.Enum):
    """Base of the enums that type choice fields (``class Problem(Choice): tsp = "tsp"; cvrp = "cvrp"``).

    Members are strings: ``cfg.env.problem == "tsp"``, ``PRESETS[cfg.model.size]``, ``f"{cfg.env.problem}"``
    (the value, not ``Problem.tsp``) and JSON all see the plain value. Each member's name must equal
    its value: OmegaConf writes the name to ``config.yaml`` and reads it back by name.
    """

    def __init__(self, *args: Any) -> None:
        if self._name_ != self._value_:
            raise TypeError(f"{type(self).__name__}.{self._name_} = {self._value_!r}: a Choice member's name "
                            "and value must be equal (config files store the name)")

    __str__ = str.__str__
    __format__ = str.__format__

    @classmethod
    def values(cls) -> list[str]:
        """The valid values, in definition order."""
        return [member.value for member in cls]


@contextlib.contextmanager
def config_errors(key: str, *errors: type[BaseException]) -> Iterator[None]:
    """Turns the listed exception types raised inside the block into a :class:`ConfigError` about
    ``key`` (e.g. a dev set that does not fit the problem: ``with config_errors("env.dev_set",
    DevSetError): load_dev_set(...)``), so the command line reports them as one line."""
    try:
        yield
    except errors as err:
        raise ConfigError(f"{key}: {err}") from None


def doc(default: Any, help: str) -> Any:  # noqa: A002 - "help" reads best at call sites
    """A dataclass field with a default and a one-line description shown by ``--help``.

    Mutable defaults (dataclass instances, dicts, lists) are wrapped in a ``default_factory``.
    """
    metadata = {"help": help}
    if dataclasses.is_dataclass(default) and not isinstance(default, type):
        return dataclasses.field(default_factory=lambda: dataclasses.replace(default), metadata=metadata)
    if isinstance(default, (dict, list)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def _field_type(schema: type, name: str) -> Any:
    return typing.get_type_hints(schema)[name]


def _choice_type(tp: Any) -> type[enum.Enum] | None:
    """The enum of a choice field's type (``Problem`` or ``Optional[Problem]``), else None."""
    if typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        tp = args[0] if len(args) == 1 else None
    return tp if isinstance(tp, type) and issubclass(tp, enum.Enum) else None


def _leaf_type(schema: type, dotted_key: str) -> Any:
    """The annotated type of the field at ``dotted_key`` (None when there is no such field)."""
    node: Any = schema
    for part in dotted_key.split("."):
        if not (isinstance(node, type) and dataclasses.is_dataclass(node)):
            return None
        hints = typing.get_type_hints(node)
        if part not in hints:
            return None
        node = hints[part]
    return node


def _choices(enum_type: type[enum.Enum]) -> str:
    return ", ".join(str(member.name) for member in enum_type)


def valid_keys(schema: type, dotted_prefix: str = "") -> list[str]:
    """Names of the fields at ``dotted_prefix`` ('' for the top level) of a dataclass schema."""
    node = schema
    if dotted_prefix:
        for part in dotted_prefix.split("."):
            hints = typing.get_type_hints(node)
            if part not in hints or not dataclasses.is_dataclass(hints[part]):
                return []
            node = hints[part]
    return [f.name for f in dataclasses.fields(node)]


def _describe(exc: OmegaConfBaseException, schema: type, source: str) -> ConfigError:
    full_key = getattr(exc, "full_key", None) or ""
    if isinstance(exc, ConfigKeyError) or "Key '" in str(exc) and "not in" in str(exc):
        parent, _, leaf = full_key.rpartition(".")
        keys = valid_keys(schema, parent)
        where = f"'{parent}'" if parent else "the top level"
        return ConfigError(
            f"unknown config key '{full_key}' in {source}. Valid keys at {where}: {', '.join(keys)}"
        )
    if isinstance(exc, ValidationError):
        choice = _choice_type(_leaf_type(schema, full_key)) if full_key else None
        if choice is not None:  # a choice field: name the key and list the valid values
            value = getattr(exc, "value", None)
            got = "null" if value is None else repr(value if isinstance(value, (str, int, float, bool)) else str(value))
            return ConfigError(f"{full_key} must be one of {_choices(choice)}; got {got} (in {source})")
        msg = str(exc).splitlines()[0]
        return ConfigError(f"wrong type for config key '{full_key}' in {source}: {msg}")
    return ConfigError(f"invalid config in {source}: {str(exc).splitlines()[0]}")


def _merge(base: DictConfig, other: Any, schema: type, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, other)
    except OmegaConfBaseException as exc:
        raise _describe(exc, schema, source) from None


def load_config(
    schema: type, yaml_files: Sequence[str | os.PathLike] = (), overrides: Sequence[str] = ()
) -> DictConfig:
    """Builds the config: dataclass defaults, then each YAML in order, then CLI overrides.

    Args:
        schema: the root dataclass type.
        yaml_files: YAML files merged in order (base first, then env/scenario files); mappings
            merge key by key.
        overrides: ``dotted.key=value`` strings; values are parsed as YAML (``1e-3``, ``true``,
            ``[1, 2]``, ``{a: 1}``) and *replace* the current value (``env.kwargs={}`` empties it).

    Returns:
        A read-only ``DictConfig`` that still enforces the schema.

    Raises:
        ConfigError: unknown key, wrong type, malformed override or missing/invalid YAML file.
    """
    cfg = OmegaConf.structured(schema)
    for path in yaml_files:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = OmegaConf.load(path)
        except Exception as exc:  # yaml.YAMLError and friends
            raise ConfigError(f"could not parse {path}: {exc}") from None
        if loaded is None or not isinstance(loaded, DictConfig):
            raise ConfigError(f"{path} must hold a mapping of config keys")
        cfg = _merge(cfg, loaded, schema, str(path))
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(
                f"override '{item}' is not of the form key=value. Top-level keys: "
                f"{', '.join(valid_keys(schema))}"
            )
        key, _, raw = item.partition("=")
        try:
            value = OmegaConf.to_container(OmegaConf.from_dotlist([f"v={raw}"]))["v"]
        except OmegaConfBaseException as exc:
            raise ConfigError(f"could not parse override '{item}': {exc}") from None
        # An override *replaces* the value (env.kwargs={} empties the dict); YAML layers merge.
        try:
            OmegaConf.update(cfg, key, value, merge=False)
        except OmegaConfBaseException as exc:
            raise _describe(exc, schema, f"command-line override '{item}'") from None
    OmegaConf.set_readonly(cfg, True)
    return cfg


_RANGES = {
    "> 0": (lambda v: v > 0, "> 0"),
    ">= 0": (lambda v: v >= 0, ">= 0"),
    ">= 1": (lambda v: v >= 1, ">= 1"),
    ">= 2": (lambda v: v >= 2, ">= 2"),
    "(0, 1]": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "[0, 1]": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "[0, 1)": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "(0, 1)": (lambda v: 0 < v < 1, "in (0, 1)"),
}


def check_ranges(cfg: Any, rules: dict[str, str]) -> None:
    """Checks numeric fields of a config object against ranges: ``{"ppo.lr": "> 0", "ppo.gamma":
    "(0, 1]", ...}`` (the keys of :data:`_RANGES`). Every value must also be finite (an infinite
    learning rate or a NaN discount is never meant). Raises :class:`ConfigError` naming the key,
    the value and the range."""
    import math

    for key, rule in rules.items():
        value = cfg
        for part in key.split("."):
            value = getattr(value, part)
        test, text = _RANGES[rule]
        if not math.isfinite(float(value)):
            raise ConfigError(f"{key} must be a finite number ({text}), got {value}")
        if not test(value):
            raise ConfigError(f"{key} must be {text}, got {value}")


def to_object(cfg: DictConfig) -> Any:
    """The config as instances of the schema dataclasses (typed attribute access)."""
    return OmegaConf.to_object(cfg)


def save_config(cfg: DictConfig, path: str | os.PathLike) -> None:
    """Writes the resolved config as YAML (atomically). Choice fields are written as their plain
    names, so ``load_config(schema, [path])`` reads the file back (``--resume``)."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(OmegaConf.to_yaml(cfg, resolve=True))
    os.replace(tmp, path)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is None:
        return getattr(tp, "__name__", str(tp))
    args = ", ".join(_type_name(a) for a in typing.get_args(tp))
    name = getattr(origin, "__name__", str(origin))
    return f"{name}[{args}]"


def _field_default(field: dataclasses.Field, instance: Any = None) -> Any:
    """The default of ``field``: taken from ``instance`` (the parent's default object, which may set
    other values than its class, e.g. ``doc(OptimConfig(actor_lr=1e-4), ...)``) when there is one."""
    if instance is not None:
        return getattr(instance, field.name)
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return field.default_factory()  # type: ignore[misc]
    return dataclasses.MISSING


def help_text(schema: type, prefix: str = "", _defaults: Any = None) -> str:
    """One line per leaf field: ``dotted.key  (type, default)  doc``; a choice field lists its
    values: ``(one of: tsp, cvrp; default 'tsp')``."""
    lines = []
    hints = typing.get_type_hints(schema)
    for field in dataclasses.fields(schema):
        tp = hints[field.name]
        key = f"{prefix}{field.name}"
        default = _field_default(field, _defaults)
        if dataclasses.is_dataclass(tp):
            lines.append(f"[{key}] {field.metadata.get('help', '')}".rstrip())
            nested = default if dataclasses.is_dataclass(default) else None
            lines.append(help_text(tp, prefix=f"{key}.", _defaults=nested))
            continue
        if default is dataclasses.MISSING:
            shown = "???"
        elif isinstance(default, enum.Enum):
            shown = repr(default.name)
        else:
            shown = repr(default)
        choice = _choice_type(tp)
        kind = f"one of: {_choices(choice)};" if choice is not None else f"{_type_name(tp)},"
        lines.append(f"  {key:<34} ({kind} default {shown})  {field.metadata.get('help', '')}")
    return "\n".join(lines)
