"""``python -m jobspool``: the same as the ``jobspool`` command."""

from jobspool.cli import main

main()
