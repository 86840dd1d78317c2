"""What the commands share: the help formatter of ``nmsparse train`` and ``nmsparse prune`` (argparse's
defaults in the help text, except ``None``: options whose help already says what happens when they are
not given; ``nmsparse reproduce`` writes its defaults into its help itself, since they depend on
--quick / --demo), and :func:`fail`, the one-line error every command prints for a user's mistake."""

from __future__ import annotations

import argparse
import sys


def fail(command: str, msg: str) -> int:
    """Print ``nmsparse COMMAND: error: MSG`` as one line on stderr; return the exit code 2."""
    print(f"nmsparse {command}: error: {msg}", file=sys.stderr)
    return 2


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """:class:`argparse.ArgumentDefaultsHelpFormatter` without ``(default: None)``."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None:
            return action.help
        return super()._get_help_string(action)
