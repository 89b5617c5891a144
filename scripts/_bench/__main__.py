"""``python -m _bench [--quick] ...`` (via scripts/bench) or ``python -m _bench child JSON``."""

from __future__ import annotations

import sys

if len(sys.argv) > 2 and sys.argv[1] == "child":
    from .child import main as child_main

    child_main(sys.argv[2])
else:
    from .runner import main

    sys.exit(main(sys.argv[1:]))
