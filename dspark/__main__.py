"""`python -m dspark ...` runs the command line (see dspark.cli)."""
import sys

from .cli import main

sys.exit(main())
