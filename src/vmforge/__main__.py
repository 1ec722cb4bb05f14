"""``python -m vmforge`` runs the command line."""

from vmforge.cli.main import run

run()
