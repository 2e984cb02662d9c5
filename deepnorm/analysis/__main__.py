"""``python -m deepnorm.analysis COMMAND --out=DIR``; see deepnorm/analysis/cli.py."""

import sys

from deepnorm.analysis.cli import main

sys.exit(main())
