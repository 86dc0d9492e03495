"""The ``mdsd`` command line: thin entry points over the library (one module per group).

core:  ``mdsd bound``, ``mdsd compare``
decode: ``mdsd generate``, ``mdsd bench``
experiments: ``mdsd measure``, ``mdsd report``
audit: ``mdsd audit`` (mdsd.testing)
"""

from __future__ import annotations

import typer

app = typer.Typer(
    name="mdsd",
    help="Optimal multi-draft speculative decoding: bounds, verifiers, tree decoding.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Command modules register themselves on `app` when imported.
from mdsd.cli import audit, core, decode, experiments  # noqa: E402,F401


def main() -> None:
    app()
