"""``python -m deepnorm.analysis COMMAND [--config=...] [--config.KEY=VALUE]``; see cli.py."""

import sys

from deepnorm.analysis.cli import main

sys.exit(main())
