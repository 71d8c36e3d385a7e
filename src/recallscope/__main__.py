from recallscope.cli import main

main()
