import sys

from pipelines.cli import entry

sys.exit(entry())
