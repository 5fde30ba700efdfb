"""The help formatter of the commands: each option's default shown once, where there is one to show."""

from __future__ import annotations

import argparse
import re

_STATES_A_DEFAULT = re.compile(r"\bdefault\b", re.IGNORECASE)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``ArgumentDefaultsHelpFormatter``, which appends "(default: X)" to every option, except
    where X says nothing or is said already: a default of None (the help text says what happens
    then), a required option, a flag's False, and a help text that states its default itself
    (tests/test_cli_help.py walks every command's parser)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        flag_off = action.nargs == 0 and action.default is False
        if action.default is None or action.required or flag_off or _STATES_A_DEFAULT.search(text):
            return action.help
        return super()._get_help_string(action)
