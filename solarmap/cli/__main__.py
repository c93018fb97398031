"""``python -m solarmap.cli``: the same as the ``solarmap`` command."""

from solarmap.cli import main

main()
