"""``python -m kdcache.service`` is ``teacher-serve``."""

import sys

from .cli import serve_main

sys.exit(serve_main())
