"""``python -m pushsvc`` is the ``pushsvc`` command."""

from .cli import main

raise SystemExit(main())
