"""``python -m tgi_adapter``: the same as the ``tgi-adapter`` command."""

import sys

from .cli import main

sys.exit(main())
