"""Command-line plumbing of the flat scripts (main.py, attack_*.py, report.py): flags, the
checks of user input made before anything is written, and ``error: <one line>`` with exit
status 2 (:func:`cli.args.run`). Library code never imports from here."""
