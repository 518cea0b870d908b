"""Human units for sizes, rates and durations, shared by the node's flags and the simulator's scenarios.

Never guesses: an unknown unit is a ValueError naming the text, so a typo in a scenario or flag is caught.
MB = 10**6 bytes and MiB = 2**20 bytes; rates in bits (Mbit/s, Gbit/s, Mb/s, Mbps) are converted to bytes per
second. In a rate the prefix may be either case (k, K, M, m...), but B and b are not the same unit: B is a
byte, b a bit, as everywhere else (`100 Mb/s` is 12.5 MB/s, `100 MBps` 100 MB/s; found in review: the two were
swapped). A size is never in bits, so there case does not matter (`20gb` = `20GB`).
"""

from __future__ import annotations

import math
import re

_PREFIX = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
           "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}
_SIZE_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,  # "20G" as --max-disk takes it: binary
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_TIME_UNITS = {"": 1.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "m": 60.0, "min": 60.0, "h": 3600.0}
_NUMBER = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-zA-Z/]*)\s*$")
# a unit: a prefix, then B (bytes) or b / bit (bits), then for a rate /s or ps
_UNIT = re.compile(r"^(?P<prefix>[kKmMgGtT][iI]?)?(?P<base>B|b|[bB][iI][tT])?(?P<per>/[sS]|[pP][sS])?$")


def _split(text: str | int | float, what: str) -> tuple[float, str]:
    if isinstance(text, int | float) and not isinstance(text, bool):
        value, unit = float(text), ""
    else:
        m = _NUMBER.match(str(text))
        if not m:
            raise ValueError(f"not a {what}: {text!r}")
        value, unit = float(m.group(1)), m.group(2)
    # "1e400" is inf, and TOML has inf, nan and negative numbers: none is a size, a rate or a duration (int(inf)
    # was an OverflowError traceback, a negative timeout a node that served nothing).
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"not a {what}: {text!r} (a finite number >= 0)")
    return value, unit


def _unit(unit: str) -> tuple[int, str, str] | None:
    """(prefix multiplier, "byte" or "bit", per-second suffix) of a unit, or None."""
    m = _UNIT.match(unit)
    if m is None or not unit:
        return None
    base = m.group("base")
    kind = "byte" if base == "B" else "bit" if base else ""
    return _PREFIX[(m.group("prefix") or "").lower()], kind, m.group("per") or ""


def parse_size(text: str | int | float) -> int:
    """'20GiB' -> 21474836480; a bare number is bytes. Case does not matter here: a size is never in bits."""
    value, unit = _split(text, "size")
    factor = _SIZE_UNITS.get(unit.lower())
    if factor is None:
        raise ValueError(f"unknown size unit in {text!r} (use B, kB, MB, GB, KiB, MiB, GiB)")
    return int(value * factor)


def parse_rate(text: str | int | float) -> float:
    """'1 Gbit/s' -> 125e6 bytes per second; a bare number is bytes per second."""
    value, unit = _split(text, "rate")
    if unit == "":
        return value
    u = _unit(unit)
    if u is None or not u[1] or not u[2]:
        raise ValueError(f"unknown rate unit in {text!r} (use MB/s, MiB/s, Mbit/s, Gbit/s)")
    rate = value * u[0] / (8 if u[1] == "bit" else 1)
    if rate == math.inf:  # "1e300 GB/s": a limit of inf was no limit at all, and a scenario said "must be positive"
        raise ValueError(f"{text!r} is too large a rate")
    return rate


def parse_duration(text: str | int | float) -> float:
    """'1 ms' -> 0.001; a bare number is seconds."""
    value, unit = _split(text, "duration")
    unit = unit.lower()  # "30S" and "1H" as before: only a rate's B and b differ by case
    if unit not in _TIME_UNITS:
        raise ValueError(f"unknown time unit in {text!r} (use ms, s, min, h)")
    seconds = value * _TIME_UNITS[unit]
    if seconds == math.inf:
        raise ValueError(f"{text!r} is too long a time")
    return seconds


def format_size(n: float) -> str:
    """Bytes as a short human string with binary units (for logs and tables)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
