"""``python -m vlmcompress``: the command line (so ``accelerate launch -m vlmcompress run ...`` works)."""
from vlmcompress.cli import main

raise SystemExit(main())
