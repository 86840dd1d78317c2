"""The help formatter of ``nmsparse train`` and ``nmsparse prune``: argparse's defaults in the help
text, except ``None`` (options whose help already says what happens when they are not given).
``nmsparse reproduce`` writes its defaults into its help itself, since they depend on --quick / --demo."""

from __future__ import annotations

import argparse


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """:class:`argparse.ArgumentDefaultsHelpFormatter` without ``(default: None)``."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None:
            return action.help
        return super()._get_help_string(action)
