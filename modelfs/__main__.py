"""``python -m modelfs`` is the same as the ``modelfs`` console script."""

from modelfs.cli import main

raise SystemExit(main())
