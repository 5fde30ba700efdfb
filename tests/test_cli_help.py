"""Every command's parser: each option has a help text that shows its default once (never
"(default: None)"), the command's main runs that parser, and ``offline-distill``'s usage names
``--list-students``. The commands are read from pyproject.toml, so a new one without a parser
here fails."""

from __future__ import annotations

import argparse
import importlib
import re
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# command -> (module, parser function, main function)
COMMANDS = {
    "offline-distill": ("kdcache.offline.cli", "distill_parser", "distill_main"),
    "cache-inspect": ("kdcache.offline.cli", "inspect_parser", "inspect_main"),
    "cache-convert": ("kdcache.offline.convert", "parser", "main"),
    "teacher-serve": ("kdcache.service.cli", "serve_parser", "serve_main"),
    "teacher-push": ("kdcache.service.push", "push_parser", "push_main"),
    "distill-demo": ("kdcache.demo.digits", "demo_parser", "main"),
    "python -m kdcache.demo.sweep": ("kdcache.demo.sweep", "sweep_parser", "main"),
}
DEFAULT_WORD = re.compile(r"\bdefault\b", re.IGNORECASE)


def function(command: str, which: int) -> Callable:
    module, *names = COMMANDS[command]
    return getattr(importlib.import_module(module), names[which - 1])


def expanded_help(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    """One action's help as ``--help`` prints it (with what ArgumentDefaultsHelpFormatter or
    BooleanOptionalAction append), on one line. ``_expand_help`` is the formatter's own step."""
    return " ".join(parser._get_formatter()._expand_help(action).split())


def help_problems(parser: argparse.ArgumentParser) -> list[str]:
    problems = []
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
            continue
        name = "/".join(action.option_strings) or action.dest
        if not action.help or action.help == argparse.SUPPRESS:
            problems.append(f"{name}: no help text")
            continue
        text = expanded_help(parser, action)
        mentions = len(DEFAULT_WORD.findall(text))
        if "(default: None)" in text:
            problems.append(f"{name}: shows '(default: None)': {text!r}")
        elif mentions > 1:
            problems.append(f"{name}: states its default more than once: {text!r}")
        is_flag = action.nargs == 0 and not isinstance(action, argparse.BooleanOptionalAction)
        has_default = action.default not in (None, False, argparse.SUPPRESS) and not action.required
        if has_default and not is_flag and mentions == 0:
            problems.append(f"{name}: default {action.default!r} is not shown: {text!r}")
    return problems


def test_every_console_script_is_covered():
    section = (ROOT / "pyproject.toml").read_text().split("[project.scripts]\n", 1)[1].split("\n[", 1)[0]
    scripts = dict(re.findall(r'^([\w-]+) = "([\w.:]+)"$', section, re.MULTILINE))
    assert "teacher-serve" in scripts
    covered = {command for command in COMMANDS if not command.startswith("python -m")}
    assert set(scripts) == covered, "add the new command's parser to COMMANDS"
    for command, entry in scripts.items():
        module, _ = entry.split(":")
        assert module == COMMANDS[command][0], f"{command}: its parser lives beside {entry}"


@pytest.mark.parametrize("command", COMMANDS)
def test_every_option_has_a_help_text_showing_its_default_once(command):
    parser = function(command, 1)()
    assert parser.prog == command
    assert help_problems(parser) == []


@pytest.mark.parametrize("command", COMMANDS)
def test_the_main_parses_with_that_parser(command, capsys):
    with pytest.raises(SystemExit) as exited:
        function(command, 2)(["--help"])
    assert exited.value.code == 0
    assert capsys.readouterr().out == function(command, 1)().format_help()


def test_the_checks_catch_what_they_are_for():
    p = argparse.ArgumentParser(prog="x", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--bare", type=int, default=3)
    p.add_argument("--twice", type=int, default=4, help="workers (default 4)")
    p.add_argument("--none", default=None, help="a path")
    p.add_argument("--fine", type=int, default=5, help="rows")
    p.add_argument("--flag", action="store_true", help="on or off")
    plain = argparse.ArgumentParser(prog="y")
    plain.add_argument("--hidden", type=int, default=6, help="a number")
    plain.add_argument("--stated", type=int, default=7, help="a number (default 7)")
    problems = help_problems(p) + help_problems(plain)
    assert [problem.split(":")[0] for problem in problems] == ["--bare", "--twice", "--none", "--hidden"]


def test_list_students_is_in_the_usage_and_prints_the_students(capsys):
    from kdcache.offline import models
    from kdcache.offline.cli import distill_main, distill_parser

    assert "--list-students" in distill_parser().format_usage()
    with pytest.raises(SystemExit) as exited:  # as --help does, before --cache is asked for
        distill_main(["--list-students"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert out.strip() and all(name in out for name in models.REGISTRY)
