"""Helpers shared by the command modules: registry choices, defaults read from the configs,
``--print-config``, and turning parsed options into one config.

Import-light on purpose (argparse, dataclasses, json): the registries the options name are
plain-Python modules (:mod:`raymimic.choices`, :mod:`raymimic.select.names`, ...), read when
their names are needed (an option is checked or help is shown); building a parser or its help
imports neither torch nor Ray.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
from collections.abc import Callable, Iterable
from typing import Any, NoReturn, TypeVar

T = TypeVar("T")


class Names:
    """The names of a library registry (``module:attribute``: a dict's keys or a tuple), loaded on first use.

    Usable as argparse ``choices`` (give the argument a ``metavar``: argparse then iterates the
    choices only to check a value or to format help) and in help strings via ``%(choices)s``.
    """

    def __init__(self, module: str, attribute: str):
        self.module, self.attribute = module, attribute
        self._names: tuple[str, ...] | None = None

    def names(self) -> tuple[str, ...]:
        if self._names is None:
            self._names = tuple(getattr(importlib.import_module(self.module), self.attribute))
        return self._names

    def __iter__(self):
        return iter(self.names())

    def __contains__(self, value) -> bool:
        return value in self.names()

    def __len__(self) -> int:
        return len(self.names())

    def __str__(self) -> str:
        return ", ".join(self.names())

    def __repr__(self) -> str:
        return f"Names({self.module}.{self.attribute})"


WEIGHTINGS = Names("raymimic.choices", "WEIGHTINGS")
MIMIC_LAYER_ALIASES = Names("raymimic.choices", "MIMIC_LAYER_ALIASES")
MIMIC_METHODS = Names("raymimic.select.names", "MIMIC_METHODS")
FEATURES = Names("raymimic.select.names", "FEATURES")
VOTE_RULES = Names("raymimic.select.names", "RULES")


def default(cls: type, name: str) -> Any:
    """The default of dataclass field ``name`` of ``cls``: help texts show it without repeating it."""
    for f in dataclasses.fields(cls):
        if f.name == name:
            if f.default is not dataclasses.MISSING:
                return f.default
            if f.default_factory is not dataclasses.MISSING:
                return f.default_factory()
            raise ValueError(f"{cls.__name__}.{name} has no default")
    raise KeyError(f"{cls.__name__} has no field {name!r}")


def add_lazy(group, *flags: str, names: Names | None = None, config_default: Any = None, **kwargs) -> argparse.Action:
    """``add_argument`` whose help may say ``%(names)s`` (a registry's names) and ``%(config_default)s`` (the config's default).

    argparse fills ``%(...)s`` from the action's attributes when it formats help, so a registry is
    read only when help is shown.
    """
    action = group.add_argument(*flags, **kwargs)
    action.names = names
    action.config_default = config_default
    return action


def resources_option(text: str) -> dict[str, float]:
    """``NAME=AMOUNT[,NAME=AMOUNT...]`` -> ``{NAME: AMOUNT}`` (argparse reports a bad one as an error, exit 2)."""
    resources = {}
    for entry in text.split(","):
        name, sep, amount = entry.partition("=")
        try:
            resources[name.strip()] = float(amount)
        except ValueError:
            sep = ""
        if not sep or not name.strip():
            raise argparse.ArgumentTypeError(f"{entry!r} is not NAME=AMOUNT (a Ray resource name and a number)")
    return resources


def add_print_config(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--print-config", action="store_true",
                        help="print the fully resolved configuration as JSON and exit (starts nothing, writes nothing)")


def given(args: argparse.Namespace, names: Iterable[str], rename: dict[str, str] | None = None) -> dict:
    """The options among ``names`` the user gave (not None), keyed by config field (``rename``: option -> field)."""
    rename = rename or {}
    return {rename.get(n, n): getattr(args, n) for n in names if getattr(args, n, None) is not None}


def fail(parser: argparse.ArgumentParser, message: str) -> NoReturn:
    """A command-line mistake: one line ``PROG: error: MESSAGE`` on stderr, exit status 2 (as argparse's own errors)."""
    parser.exit(2, f"{parser.prog}: error: {message}\n")


def build(parser: argparse.ArgumentParser, factory: Callable[..., T], *args, **kwargs) -> T:
    """``factory(*args, **kwargs)``; a ``ValueError`` (a bad option value) becomes :func:`fail` (exit status 2)."""
    try:
        return factory(*args, **kwargs)
    except ValueError as error:
        fail(parser, str(error))


def print_config(config) -> int:
    print(config.to_json())
    return 0
