"""``python -m erf`` runs the command-line interface (Ctrl-C while starting: one line, status 130)."""
import sys

try:
    from erf.cli import main_entry
except KeyboardInterrupt:
    sys.stderr.write("erf: interrupted\n")
    sys.exit(130)

main_entry()
