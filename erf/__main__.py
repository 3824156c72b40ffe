"""``python -m erf`` runs the command-line interface."""
from erf.cli import main_entry

main_entry()
