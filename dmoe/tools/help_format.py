"""The `--help` layout every dmoe command uses: each flag's help ends with its default
(argparse's ArgumentDefaultsHelpFormatter), except where there is none to show (None, or
a flag without a value); descriptions and epilogs are printed as written."""
from __future__ import annotations

import argparse


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.nargs == 0:
            return action.help or ""
        return super()._get_help_string(action)


def summary(doc: str | None) -> str:
    """A module docstring's first paragraph as one line: a command's --help description."""
    first = (doc or "").strip().split("\n\n", 1)[0]
    return " ".join(first.split())
