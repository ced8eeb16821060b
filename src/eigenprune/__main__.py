"""`python -m eigenprune` (also what `torchrun -m eigenprune` launches)."""

from eigenprune.cli import main

raise SystemExit(main())
