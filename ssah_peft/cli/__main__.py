"""``python -m ssah_peft.cli ...`` (as launchers such as torchrun and accelerate launch run it): the command line."""

from . import main

raise SystemExit(main())
