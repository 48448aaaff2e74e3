"""The errors qlorakit raises. Each message says what was wrong, where, and what to do; `show` bounds the values
put into messages and `check_number` is the one range check of numeric parameters."""

import math as _math
import reprlib as _reprlib


class QLoraKitError(Exception):
    """Base class of every error qlorakit raises on purpose."""


class ConfigError(QLoraKitError, ValueError):
    """A parameter, option or field has a value qlorakit cannot use."""


class SourceError(QLoraKitError, ValueError):
    """A model source (directory, file or name) cannot be loaded."""


class PrecisionError(QLoraKitError, ValueError):
    """A dtype, scaler or quantization state breaks the precision policy (DESIGN.md)."""


class DataError(QLoraKitError, ValueError):
    """A data file or one of its rows cannot be used; the message names the file, line and field."""


class UpstreamError(QLoraKitError, RuntimeError):
    """An installed library (peft, bitsandbytes, transformers, accelerate, torch) no longer has an internal that
    qlorakit relies on; the message names it and the versions qlorakit supports (qlorakit.upstream)."""


class TrainingError(QLoraKitError, RuntimeError):
    """Training cannot go on (for example a non-finite loss outside fp16); the last good checkpoint is intact."""


_short = _reprlib.Repr()
_short.maxstring, _short.maxother, _short.maxlist, _short.maxtuple, _short.maxdict, _short.maxlevel = 80, 80, 6, 6, 6, 3


def show(value) -> str:
    """repr() bounded in length and depth, for every user-controlled value in a message: values may be huge (a
    file's worth of text, an exception quoting it) or self-referencing (YAML aliases)."""
    return _short.repr(value)


def check_number(name: str, value, low: float | None = None, high: float | None = None, *, low_ok: bool = False,
                 high_ok: bool = True, allow_none: bool = False, hint: str = "", where: str | None = None) -> None:
    """The one range check of a numeric parameter: a real number (not a bool), finite, within low..high (each bound
    open or closed as low_ok / high_ok say; None: unbounded). Raises ConfigError naming the parameter, its value,
    the range and `hint` (typical values)."""
    if value is None and allow_none:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and _math.isfinite(value)
    if ok and low is not None:
        ok = value >= low if low_ok else value > low
    if ok and high is not None:
        ok = value <= high if high_ok else value < high
    if ok:
        return
    if low is not None and high is not None:
        what = f"a finite number in {'[' if low_ok else '('}{low:g}, {high:g}{']' if high_ok else ')'}"
    elif low == 0 and not low_ok:
        what = "a positive finite number"
    elif low is not None:
        what = f"a finite number, {low:g} or more" if low_ok else f"a finite number above {low:g}"
    elif high is not None:
        what = f"a finite number, {high:g} or less" if high_ok else f"a finite number below {high:g}"
    else:
        what = "a finite number"
    what += ", or None" if allow_none else ""
    prefix = f"{where}: " if where else ""
    raise ConfigError(f"{prefix}{name}={show(value)} must be {what}" + (f" ({hint})" if hint else ""))
