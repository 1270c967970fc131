"""`python -m vlkit ...`: the same command line as `vlkit ...`."""

from vlkit.cli import main

main()
