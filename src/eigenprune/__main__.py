"""`python -m eigenprune` (also what `torchrun -m eigenprune` launches)."""

from eigenprune._entry import main

raise SystemExit(main())
