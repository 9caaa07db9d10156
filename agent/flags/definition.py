"""Flag definitions: name, type, default, bounds, and how values are checked and parsed.

Import these from agent.flags; this module only keeps agent/flags.py small.
"""

from __future__ import annotations

import builtins
import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from agent.errors import ConfigError, FlagError

ENV_PREFIX = "SIDECAR_AGENT_FLAG_"
TYPES = ("bool", "int", "float", "enum")

_Num = int | float  # not `float`: the Flag class body defines a `float` helper
_SEGMENT = r"[a-z0-9]+(?:[_-][a-z0-9]+)*"
_NAME = re.compile(rf"^{_SEGMENT}(?:\.{_SEGMENT})*$")
_BOOL_TEXT = {
    "true": True, "1": True, "yes": True, "on": True,
    "false": False, "0": False, "no": False, "off": False,
}  # fmt: skip
_INT_TEXT = re.compile(r"^[+-]?\d+$")


class UnknownFlagError(FlagError):
    """No flag has this name (the HTTP layer answers 404 rather than 400)."""


class FlagConfigError(FlagError, ConfigError):
    """A bad flag value in config or the environment: both a FlagError and a ConfigError."""


def env_var(name: str) -> str:
    """The environment variable for a flag: `sinks.jsonl.enabled` -> SIDECAR_AGENT_FLAG_SINKS__JSONL__ENABLED."""
    return ENV_PREFIX + name.upper().replace(".", "__").replace("-", "_")


def _fmt_num(x: Any) -> str:
    if isinstance(x, float) and x.is_integer():
        return str(int(x))
    return str(x)


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float, str)):
        return repr(value)
    return f"{value!r} (a {type(value).__name__})"


@dataclass(frozen=True)
class Flag:
    """A flag definition. Build one with Flag.bool / Flag.int / Flag.float / Flag.enum.

    `validate`, when given, is called with the typed value and returns None when it is
    fine, or a message (it may also raise ValueError with the message).
    """

    name: str
    type: str
    default: Any
    description: str = ""
    choices: tuple[str, ...] = ()
    min: _Num | None = None
    max: _Num | None = None
    validate: Callable[[Any], str | None] | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        where = f"flag {self.name!r} (definition)"
        if not isinstance(self.name, str) or not _NAME.match(self.name):
            raise FlagError(f"{where}: a name is dotted lower-case segments of a-z, 0-9, _ and -")
        if self.type not in TYPES:
            raise FlagError(f"{where}: type must be one of {', '.join(TYPES)}, got {self.type!r}")
        object.__setattr__(self, "choices", tuple(self.choices))
        if self.type == "enum":
            if not self.choices or not all(isinstance(c, str) and c for c in self.choices):
                raise FlagError(f"{where}: an enum needs a non-empty list of string choices")
            if len(set(self.choices)) != len(self.choices):
                raise FlagError(f"{where}: duplicate choices")
        elif self.choices:
            raise FlagError(f"{where}: only an enum has choices")
        for bound in (self.min, self.max):
            if bound is not None and (self.type not in ("int", "float") or not _is_number(bound)):
                raise FlagError(f"{where}: min/max must be numbers, on an int or float flag")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise FlagError(f"{where}: min is greater than max")
        try:
            object.__setattr__(self, "default", self.convert(self.default, "typed"))
        except ValueError as exc:
            raise FlagError(f"flag {self.name} (default): {exc}") from None

    # -- helpers -------------------------------------------------------------------

    @classmethod
    def bool(cls, name: str, default: Any, description: str = "", *, validate: Any = None) -> Flag:
        """A true/false flag."""
        return cls(name, "bool", default, description, validate=validate)

    @classmethod
    def int(cls, name: str, default: Any, description: str = "", *, min: Any = None, max: Any = None,
            validate: Any = None) -> Flag:  # fmt: skip
        """A whole-number flag, optionally bounded (inclusive)."""
        return cls(name, "int", default, description, min=min, max=max, validate=validate)

    @classmethod
    def float(cls, name: str, default: Any, description: str = "", *, min: Any = None, max: Any = None,
              validate: Any = None) -> Flag:  # fmt: skip
        """A number flag, optionally bounded (inclusive)."""
        return cls(name, "float", default, description, min=min, max=max, validate=validate)

    @classmethod
    def enum(cls, name: str, default: str, choices: Iterable[str], description: str = "",
             *, validate: Any = None) -> Flag:  # fmt: skip
        """A flag whose value is one of `choices`."""
        return cls(name, "enum", default, description, choices=tuple(choices), validate=validate)

    # -- values --------------------------------------------------------------------

    def expected(self) -> str:
        """What a valid value looks like, for error messages."""
        if self.type == "bool":
            return "expected true or false"
        if self.type == "enum":
            return "expected one of " + ", ".join(self.choices)
        what = "a whole number" if self.type == "int" else "a number"
        lo, hi = self.min, self.max
        if lo is not None and hi is not None:
            return f"expected {what} from {_fmt_num(lo)} to {_fmt_num(hi)}"
        if lo is not None:
            return f"expected {what} of at least {_fmt_num(lo)}"
        if hi is not None:
            return f"expected {what} of at most {_fmt_num(hi)}"
        return f"expected {what}"

    def convert(self, value: Any, mode: str = "typed") -> Any:
        """Check and normalize a value; raise ValueError with a message (no flag prefix).

        mode "typed": the value must already have the flag's type (config, override file);
        "text": the value is a string to parse (environment, CLI);
        "any": typed, or a string parsed as text (a JSON value from the HTTP API).
        """
        text = mode == "text" or (mode == "any" and isinstance(value, str) and self.type != "enum")
        if mode == "text" and not isinstance(value, str):
            raise ValueError(f"{self.expected()}, got {_show(value)}")
        out = self._parse_text(value) if text else self._typed(value)
        if out is None:
            hint = ""
            if not text and isinstance(value, str) and self._parse_text(value) is not None:
                hint = " (a string: write the value without quotes)"
            raise ValueError(f"{self.expected()}, got {_show(value)}{hint}")
        if self.type in ("int", "float") and not self._in_range(out):
            raise ValueError(f"{self.expected()}, got {_show(value)}")
        if self.validate is not None:
            try:
                problem = self.validate(out)
            except ValueError as exc:
                problem = str(exc) or "rejected by the flag's validator"
            except Exception as exc:  # a broken validator must not crash the caller
                problem = f"the flag's validator failed: {type(exc).__name__}: {exc}"
            if problem:
                raise ValueError(f"{problem}, got {_show(value)}")
        return out

    def _typed(self, value: Any) -> Any:
        t = self.type
        if t == "bool":
            return value if isinstance(value, bool) else None
        if t == "int":
            return value if isinstance(value, int) and not isinstance(value, bool) else None
        if t == "float":
            return float(value) if _is_number(value) else None
        return value if isinstance(value, str) and value in self.choices else None

    def _parse_text(self, value: Any) -> Any:
        if not isinstance(value, str):
            return None
        s = value.strip()
        t = self.type
        if t == "bool":
            return _BOOL_TEXT.get(s.lower())
        if t == "int":
            return int(s) if _INT_TEXT.match(s) else None
        if t == "float":
            try:
                f = float(s)
            except ValueError:
                return None
            return f if math.isfinite(f) else None
        return s if s in self.choices else None

    def _in_range(self, v: _Num) -> builtins.bool:  # `bool` here is the class's own helper
        return (self.min is None or v >= self.min) and (self.max is None or v <= self.max)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
