"""``python -m sparsevit {info,check,bench}``: see :mod:`sparsevit.cli`."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
