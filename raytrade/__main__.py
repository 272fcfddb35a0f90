"""``python -m raytrade``: the ``raytrade`` command (``raytrade.cli.main``)."""

import sys

from raytrade.cli import main

sys.exit(main())
