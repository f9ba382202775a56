"""Command lines as people type them: habits forgiven before jsonargparse parses.

* ``--dry-run``, ``--svi.batch-size``: dashes in a flag's name read as underscores;
* ``svi.steps=10`` (Hydra's habit) reads as ``--svi.steps 10`` when ``svi.steps`` is a flag of the command;
* ``--baselines atlas,ties`` reads as ``--baselines [atlas,ties]`` for a list flag;
* ``vtvc fit -v``: the options of ``vtvc`` itself (``-v``, ``--log_level``) move before the subcommand;
* a flag that the command does not have (``--svi.step``, which argparse would have taken as an
  abbreviation of ``--svi.steps``) is refused in one line that names the closest real flag.

Only the settings dataclasses are read (:mod:`vtvc_pyro.config`); nothing is imported that ``--help``
would wait for.
"""

from __future__ import annotations

import difflib
import typing
from dataclasses import dataclass, field, fields, is_dataclass

from .. import config
from ..errors import VTVCError

BUILT_IN = {"config": "value", "help": "switch", "print_config": "optional"}
"""Flags jsonargparse adds to every command (``--print_config`` takes an optional value)."""

REPEATABLE = ("--sweep", "--hf_vision")
"""List flags that may be given once per item (``--sweep a=1,2 --sweep b=3``): never bracketed here."""


class FlagError(VTVCError):
    """A flag the command does not have."""


@dataclass
class Flags:
    """A command's flags by name (no leading dashes): ``value``, ``list``, ``switch`` or ``optional``
    (a value when one follows); short aliases aside."""

    kinds: dict[str, str] = field(default_factory=lambda: dict(BUILT_IN))
    aliases: dict[str, str] = field(default_factory=dict)  # "-v" -> "verbose"
    positionals: bool = False  # the command takes positional arguments

    @classmethod
    def of(cls, settings: type | None) -> Flags:
        flags = cls()
        if settings is not None:
            flags._add(settings, "")
        return flags

    def _add(self, settings: type, prefix: str) -> None:
        hints = typing.get_type_hints(settings)
        for f in fields(settings):
            name, kind = prefix + f.name, config.cli_kind(f)
            if is_dataclass(hints[f.name]):
                self.kinds[name] = "value"  # a whole group as JSON (jsonargparse's --svi '{...}')
                self._add(hints[f.name], name + ".")
            elif kind == "switch":
                self.kinds[name] = "switch"
                self.aliases.update(dict.fromkeys(f.metadata.get("aliases", ()), name))
            elif kind == "positional":
                self.positionals = True
            else:
                self.kinds[name] = "list" if _is_list(hints[f.name]) else "value"

    def closest(self, name: str) -> str:
        """`` (did you mean --x?)`` for the nearest flag, or nothing when none is near."""
        near = difflib.get_close_matches(name, list(self.kinds), n=1, cutoff=0.6)
        return f": did you mean --{near[0]}?" if near else ""


def _is_list(hint) -> bool:
    if typing.get_origin(hint) is list:
        return True
    return any(typing.get_origin(arg) is list for arg in typing.get_args(hint))  # Optional[list[...]]


def _as_list(value: str) -> str:
    """``a,b`` -> ``[a,b]``; a YAML list, a mapping, a quoted string or ``null`` stays as it is."""
    stripped = value.strip()
    if stripped.startswith(("[", "{", "'", '"')) or stripped in ("null", "None", "~"):
        return value
    return f"[{stripped}]"


def _command_path(argv: list[str], tree: dict, main: Flags) -> tuple[list[str], list[str], object, list[str]]:
    """``(main options, command path, command, rest)``; ``command`` is None when argv names none."""
    head, i = [], 0
    while i < len(argv) and argv[i].startswith("-"):
        name = _flag_name(argv[i])
        takes_value = main.kinds.get(name) == "value" and "=" not in argv[i]
        head += argv[i : i + 1 + takes_value]
        i += 1 + takes_value
    node, path = tree, []
    while i < len(argv) and isinstance(node, dict) and argv[i] in node:
        node = node[argv[i]]
        path.append(argv[i])
        i += 1
    return head, path, None if isinstance(node, dict) else node, argv[i:]


def _flag_name(token: str) -> str:
    """``--svi.batch-size=8`` -> ``svi.batch_size``; jsonargparse's append form ``--baselines+`` -> ``baselines``."""
    return token.lstrip("-").partition("=")[0].removesuffix("+").replace("-", "_")


def forgive(argv: list[str], tree: dict) -> list[str]:
    """``argv`` with the habits above rewritten; ``tree`` is the command tree (``{"fit": Command, ...}``).

    Raises:
        FlagError: a flag the command does not have, naming the closest one.
    """
    main = Flags.of(config.MainOptions)
    head, path, command, rest = _command_path(argv, tree, main)
    if command is None:
        return argv  # no command named: jsonargparse says what is missing
    flags = Flags.of(command.settings)
    moved, out, i = [], [], 0
    while i < len(rest):
        token = rest[i]
        if token == "--":
            out += rest[i:]
            break
        name = _flag_name(token)
        # Hydra's key=value, where it cannot be a positional (a run folder may be named out=x)
        bare_setting = not token.startswith("-") and "=" in token and name in flags.kinds and not flags.positionals
        if token.startswith("-") and token not in ("-", "-h") and not _is_number(token):
            alias = flags.aliases.get(token) or main.aliases.get(token)
            name = alias or name
            if name not in flags.kinds and (name in main.kinds or alias):
                takes_value = main.kinds.get(name) == "value" and "=" not in token
                moved += [_underscored(token), *rest[i + 1 : i + 1 + takes_value]]  # `vtvc fit -v` is `vtvc -v fit`
                i += 1 + takes_value
                continue
            if name not in flags.kinds:
                raise FlagError(f"vtvc {' '.join(path)} has no flag {token.partition('=')[0]}{flags.closest(name)} "
                                f"(see vtvc {' '.join(path)} --help)")
        elif not bare_setting:
            out.append(token)  # a positional or a value
            i += 1
            continue
        kind, (_, has_value, value) = flags.kinds[name], token.partition("=")
        flag = _underscored(token.partition("=")[0] if token.startswith("-") else "--" + token.partition("=")[0])
        if kind == "switch" or (kind == "optional" and not has_value and (i + 1 >= len(rest) or rest[i + 1][:1] == "-")):
            out.append(token if has_value else flag)
            i += 1
            continue
        if not has_value:
            if i + 1 >= len(rest):
                out.append(flag)  # jsonargparse says the value is missing
                break
            value, i = rest[i + 1], i + 1
        repeatable = flag.removesuffix("+") in REPEATABLE  # `--sweep X` is one item: see cli._repeated_flags
        listed = kind == "list" and not repeatable and not flag.endswith("+")  # `--baselines+ x` appends one item
        value = _as_list(value) if listed else value
        # `=` keeps a value such as -1e-3 a value; a repeatable flag's item stays a token of its own
        out += [f"{flag}={value}"] if has_value and not repeatable else [flag, value]
        i += 1
    return [_underscored(t) if t.startswith("--") else t for t in head] + moved + path + out


def _underscored(token: str) -> str:
    """``--log-level=INFO`` -> ``--log_level=INFO``: dashes inside a flag's name (not its value) as underscores."""
    if not token.startswith("--"):
        return token
    name, eq, value = token[2:].partition("=")
    return "--" + name.replace("-", "_") + eq + value


def _is_number(token: str) -> bool:
    try:
        float(token)
        return True
    except ValueError:
        return False
