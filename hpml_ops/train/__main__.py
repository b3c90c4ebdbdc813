"""``python -m hpml_ops.train``: see :mod:`hpml_ops.train.cli`."""

import sys

from .cli import main

sys.exit(main())
