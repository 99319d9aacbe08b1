"""``python -m daemon.cli``: the ``pacs-triage`` command."""

from daemon.cli.main import main

main()
