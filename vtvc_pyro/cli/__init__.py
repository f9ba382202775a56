"""The ``vtvc`` command (also ``python -m vtvc_pyro``): one subcommand per thing the project does.

The subcommands are the lines of :data:`~vtvc_pyro.cli.commands.COMMANDS` (path, description,
settings dataclass, handler). Every flag comes from a field of a dataclass of :mod:`vtvc_pyro.config`
through jsonargparse, named as its field (``--svi.kl_weight``), with its default and its line of the
class docstring in ``--help``; the few positionals (``vtvc report RUN_DIR``) are fields too.
jsonargparse also gives ``--config FILE`` (JSON or YAML, e.g. a run's own ``config.json``) and
``--print_config``. List values are YAML/JSON lists (``--baselines [atlas,ties]``, ``[]`` for none) or
plain ``atlas,ties``; dashes work as underscores (``--dry-run``), ``svi.steps=10`` as
``--svi.steps 10``, and a misspelt flag is refused with the closest one (:mod:`.argv`). Building the parser imports nothing heavy (the handlers of :mod:`.commands` import what they
need when they run), so ``--help`` answers at once.

Usage::

    vtvc fit --target rot-noise --svi.steps 300 --out runs/rot-noise
    vtvc fit --config runs/rot-noise/config.json --out runs/replay
    vtvc bank build --print_config
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
import typing
from dataclasses import fields, is_dataclass

import docstring_parser
from jsonargparse import (
    ActionConfigFile,
    ArgumentParser,
    DefaultHelpFormatter,
    Namespace,
)

from .. import config
from ..errors import FitInterrupted, VTVCError
from .argv import REPEATABLE, FlagError, forgive
from .commands import COMMANDS, Command

__all__ = ["COMMANDS", "Command", "build_parser", "build_settings", "main", "entry_point"]


def _field_help(cls: type, name: str) -> str | None:
    """``name``'s line under ``Args:`` in the docstring of ``cls`` or of its nearest base that has one."""
    for klass in cls.__mro__:
        for param in docstring_parser.parse(klass.__doc__ or "").params:
            if param.arg_name == name:
                return param.description
    return None


def add_settings(parser: ArgumentParser, settings: type) -> None:
    """The fields of the ``settings`` dataclass as arguments of ``parser``.

    Plain fields go through jsonargparse (``--name VALUE``, nested dataclasses as ``--svi.steps``); the
    others as their metadata says (:func:`vtvc_pyro.config.switch`, ``positional``, ``unlisted``).
    """
    hints = typing.get_type_hints(settings)
    special = [f for f in fields(settings) if config.cli_kind(f) != "flag"]
    # positionals are the one exception to `--name VALUE`: they keep the documented command lines
    # (`vtvc report RUN_DIR`, `vtvc table RUN1 RUN2`) working; jsonargparse takes only flags from a dataclass
    for f in special:
        if config.cli_kind(f) == "positional":
            many = typing.get_origin(hints[f.name]) is list
            parser.add_argument(f.name, nargs="+" if many else None, help=_field_help(settings, f.name))
    parser.add_class_arguments(settings, nested_key=None, as_group=True, skip={f.name for f in special})
    group = parser.groups.get(settings.__name__, parser) if hasattr(parser, "groups") else parser
    for f in special:
        # a switch is a bare flag: jsonargparse's bool flags want a value (`--routing false`), and an optional
        # value would swallow the positional after it (`vtvc export --overwrite RUN_DIR`)
        if config.cli_kind(f) == "switch":
            group.add_argument(*f.metadata["aliases"], f"--{f.name}", action="store_true",
                               help=_field_help(settings, f.name))
        elif config.cli_kind(f) == "unlisted":
            group.add_argument(f"--{f.name}", type=hints[f.name], default=f.default, help=argparse.SUPPRESS)


def _parser(command: Command, defaults: dict | None = None) -> ArgumentParser:
    """A subcommand's parser: ``--config`` first (later flags override the file), then its settings;
    a command with a ``protocol`` setting takes ``defaults`` (see :func:`_parse`) where the file and
    the flags set nothing."""
    parser = ArgumentParser(description=command.help, formatter_class=DefaultHelpFormatter, exit_on_error=False,
                            allow_abbrev=False)
    parser.add_argument("--config", action=ActionConfigFile, help="settings from a JSON or YAML file (later flags win)")
    if command.settings is not None:
        add_settings(parser, command.settings)
        if defaults and "protocol" in {f.name for f in fields(command.settings)}:
            parser.set_defaults(defaults)
    return parser


def _tree(commands: typing.Iterable[Command]) -> dict:
    """``{"fit": Command, "bank": {"build": Command, ...}, ...}`` from the table's paths."""
    tree: dict = {}
    for command in commands:
        node = tree
        for name in command.path[:-1]:
            node = node.setdefault(name, {})
        node[command.path[-1]] = command
    return tree


def _add_commands(parser: ArgumentParser, tree: dict, dest: str, defaults: dict | None = None) -> None:
    sub = parser.add_subcommands(dest=dest)
    for name, entry in tree.items():
        if isinstance(entry, dict):
            group = ArgumentParser(description=f"vtvc {name} subcommands", formatter_class=DefaultHelpFormatter,
                                   exit_on_error=False, allow_abbrev=False)
            sub.add_subcommand(name, group, help=f"{name}: {', '.join(entry)}")  # jsonargparse: parents first
            _add_commands(group, entry, f"{name}_command", defaults)
        else:
            sub.add_subcommand(name, _parser(entry, defaults), help=entry.help)


def build_parser(defaults: dict | None = None) -> ArgumentParser:
    """The whole ``vtvc`` parser (cheap: no heavy import), with ``defaults`` for the settings of a
    command that has a protocol setting."""
    parser = ArgumentParser(prog="vtvc", description="Variational Task Vector Composition over open_clip CLIP models.",
                            formatter_class=DefaultHelpFormatter, exit_on_error=False,
                            allow_abbrev=False)
    add_settings(parser, config.MainOptions)
    _add_commands(parser, _tree(COMMANDS), "command", defaults)
    return parser


def build_settings(cls: type, ns: Namespace):
    """The ``cls`` dataclass (nested ones too) from the fields of a parsed namespace."""
    hints = typing.get_type_hints(cls)
    values = {}
    for f in fields(cls):
        value = ns[f.name]
        values[f.name] = build_settings(hints[f.name], value) if is_dataclass(hints[f.name]) else value
    return cls(**values)


def _selected(ns: Namespace) -> tuple[Command, Namespace]:
    """The table's line of a parsed command line, and that subcommand's namespace."""
    node, key = _tree(COMMANDS), "command"
    while True:
        name = ns[key]
        entry, ns = node[name], ns[name]
        if isinstance(entry, Command):
            return entry, ns
        node, key = entry, f"{name}_command"


def _repeated_flags(argv: list[str]) -> list[str]:
    """``--sweep X`` -> ``--sweep+ X`` (jsonargparse's append) unless X is a YAML list."""
    out = list(argv)
    for i, arg in enumerate(out[:-1]):
        if arg in REPEATABLE and not out[i + 1].lstrip().startswith("["):
            out[i] = f"{arg}+"
    return out


FIRST_PASS_SKIPS = ("-h", "--help", "--print_config")
"""Flags that print and exit while parsing: the first pass of :func:`_parse` must not see them."""


def _parse(args: list[str]) -> Namespace:
    """Parse once to learn what a command runs, then again with the defaults that follow from it:
    a replayed run's ``config.json`` (it carries a ``run`` record) takes
    :data:`~vtvc_pyro.config.LEGACY_SETTINGS` for the settings it predates; otherwise a protocol
    with its own defaults (:data:`~vtvc_pyro.config.PROTOCOL_DEFAULTS`) takes those. The file
    and the flags still override either."""
    first_args = [a for a in args if not a.startswith(FIRST_PASS_SKIPS)]
    try:
        first = build_parser().parse_args(first_args)
        _, options = _selected(first)
    except (argparse.ArgumentError, SystemExit, KeyError):  # the full parse reports it (or prints the help)
        return build_parser().parse_args(args)
    defaults = None
    if isinstance(options, Namespace) and "protocol" in options:
        if options.get("run"):
            defaults = dict(config.LEGACY_SETTINGS)
        elif config.PROTOCOL_DEFAULTS.get(options.protocol):
            defaults = {"protocol": options.protocol, **config.PROTOCOL_DEFAULTS[options.protocol]}
    if defaults is None and first_args == args:
        return first  # nothing changes: the first pass is the parse
    return build_parser(defaults).parse_args(args)


def main(argv: list[str] | None = None) -> int:
    """Run ``vtvc ARGV``; an expected fault becomes one line on stderr and an exit status
    (:data:`~vtvc_pyro.errors.EXIT_STATUS`: 2 bad input, 74 I/O error, 130/143 interrupted)."""
    try:
        args = forgive(list(sys.argv[1:] if argv is None else argv), _tree(COMMANDS))
        ns = _parse(_repeated_flags(args))
    except FlagError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except argparse.ArgumentError as err:  # one line, as for every other bad input
        message = " ".join(str(err).split())
        print(f"error: {message} (see --help)", file=sys.stderr)
        return 2
    level = "INFO" if ns.verbose and ns.log_level == "WARNING" else ns.log_level
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    command, options = _selected(ns)
    with _sigterm_as_exception():
        return _run(command, options)


def _run(command: Command, options) -> int:
    try:  # building the settings validates some of them (ConfigError)
        command.handler(None if command.settings is None else build_settings(command.settings, options))
    except FitInterrupted as err:
        print(f"interrupted: {err}", file=sys.stderr)
        return err.exit_status
    except VTVCError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, _Terminated) as err:
        sigterm = isinstance(err, _Terminated)
        print(f"{'terminated (SIGTERM)' if sigterm else 'interrupted (SIGINT)'} outside SVI: files already written "
              "are complete; run the command again (a fit: with --resume)", file=sys.stderr)
        return 143 if sigterm else 130
    except OSError as err:  # disk full, permission denied, a file removed under us
        where = f": {err.filename}" if err.filename else ""
        print(f"error: {err.strerror or err}{where} (free space, check permissions, or pass another --out)",
              file=sys.stderr)
        return 74
    return 0


class _Terminated(BaseException):  # not an Exception: no `except Exception` may swallow it
    """SIGTERM outside SVI (inside, the fit's own handler writes a checkpoint first)."""


@contextlib.contextmanager
def _sigterm_as_exception():
    """For the command's duration, SIGTERM raises :class:`_Terminated` (as SIGINT raises
    KeyboardInterrupt) so it ends in one line and status 143; the previous handler comes back after."""
    def handle(signum, frame):
        raise _Terminated()

    try:
        previous = signal.signal(signal.SIGTERM, handle)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def entry_point() -> None:
    """The installed ``vtvc`` script."""
    sys.exit(main())
