"""`python -m lbctl`: the same as the `lbctl` script."""

import sys

from lbctl.main import main

sys.exit(main())
