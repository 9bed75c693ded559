"""``python -m ocnet``: the command line (see :mod:`ocnet.cli`)."""

from .cli import main

if __name__ == "__main__":
    main()
