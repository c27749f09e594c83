"""`python -m dlplora.cli` = `dlp-lora`."""

import sys

from . import main

sys.exit(main())
