"""``python -m recallscope``: the same as the ``recallscope`` command."""

from recallscope.cli import main

main()
