"""The help formatter of every ``nmsparse`` command: argparse's defaults in the help text, except
``None`` (options whose help already says what happens when they are not given)."""

from __future__ import annotations

import argparse


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """:class:`argparse.ArgumentDefaultsHelpFormatter` without ``(default: None)``."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None:
            return action.help
        return super()._get_help_string(action)
