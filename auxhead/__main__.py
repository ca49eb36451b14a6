"""`python -m auxhead`: the same as the `auxhead` command."""

import sys

from auxhead.cli import main

sys.exit(main())
