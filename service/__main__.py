"""``python -m service`` is ``teacher-serve``."""

import sys

from service.cli import serve_main

sys.exit(serve_main())
