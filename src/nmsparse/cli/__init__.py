"""The ``nmsparse`` command line (a driver: it sits on top of every other layer).

:mod:`~nmsparse.cli.dispatch` builds the parser from one module per sub-command (``train``,
``reproduce``, ``prune`` with ``prune_hf``, ``export`` with ``export_onnx``, ``inspect``, ``distill``);
:mod:`~nmsparse.cli.help` holds the shared help formatter.
"""

from nmsparse.cli.dispatch import COMMANDS, build_parser, main

__all__ = ["COMMANDS", "build_parser", "main"]
