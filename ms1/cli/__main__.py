"""``python -m ms1.cli``: ``ms1-service``."""

import sys

from ms1.cli.command import main

sys.exit(main())
