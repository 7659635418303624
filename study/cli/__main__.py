"""``python -m study.cli``: the ``dpstudy`` command."""

import sys

from study.cli import main

sys.exit(main())
