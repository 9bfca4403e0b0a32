"""``python -m actstore.cli``: the same commands as the ``actstore`` script."""

import sys

from actstore.cli import main

sys.exit(main())
