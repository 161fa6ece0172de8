"""``python -m locallearn`` is the ``locallearn`` command."""

import sys

from locallearn.cli import main

sys.exit(main())
