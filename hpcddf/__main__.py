"""``python -m hpcddf`` is the same as the ``hpcddf`` console script."""

from hpcddf.cli import main

main()
