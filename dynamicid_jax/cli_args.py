"""argparse pieces every command line shares: checked number types and deprecated option spellings.

    p.add_argument("--guidance-scale", type=finite_float)
    add_deprecated_alias(p, "--clip-vision", "--image-encoder")   # old spelling still works, with a note
"""
from __future__ import annotations

import argparse
import math
import sys

__all__ = ["add_deprecated_alias", "finite_float", "nonnegative_float", "positive_int"]


def finite_float(text: str) -> float:
    """argparse type: a finite number (``nan`` / ``inf`` are refused with the value named)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def nonnegative_float(text: str) -> float:
    value = finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


class _DeprecatedAlias(argparse.Action):
    """Stores into the new option's ``dest`` (appending when the new option appends) and notes the rename."""

    def __init__(self, option_strings, dest, new_flag: str = "", append: bool = False, **kwargs):
        super().__init__(option_strings, dest, **kwargs)
        self.new_flag, self.append = new_flag, append

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"note: {option_string} is deprecated; use {self.new_flag} (same meaning)", file=sys.stderr)
        if self.append:
            current = getattr(namespace, self.dest, None)
            setattr(namespace, self.dest, [*(current or []), values])
        else:
            setattr(namespace, self.dest, values)


def add_deprecated_alias(parser: argparse.ArgumentParser | argparse._ArgumentGroup, old_flag: str,
                         new_flag: str) -> None:
    """Accept ``old_flag`` as a hidden, deprecated spelling of the already added ``new_flag``."""
    container = parser
    actions = getattr(container, "_actions", [])
    new = next(a for a in actions if new_flag in a.option_strings)
    container.add_argument(old_flag, dest=new.dest, action=_DeprecatedAlias, new_flag=new_flag,
                           append=isinstance(new, argparse._AppendAction), type=new.type, metavar=new.metavar,
                           help=argparse.SUPPRESS)
