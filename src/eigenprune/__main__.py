"""`python -m eigenprune` (also what `torchrun -m eigenprune` launches)."""

from .cli import main

raise SystemExit(main())
