"""`python -m trainer.predict`."""

import sys

from trainer.predict.cli import main

sys.exit(main())
