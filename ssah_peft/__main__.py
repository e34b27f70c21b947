"""``python -m ssah_peft ...``: the ``ssah-peft`` command line, for environments without the console script."""

from .cli import main

raise SystemExit(main())
