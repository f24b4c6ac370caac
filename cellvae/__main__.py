"""``python -m cellvae ...``: the command line, as ``cellvae ...``."""

import sys

from cellvae.cli import main

sys.exit(main())
