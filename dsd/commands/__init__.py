"""One module per `dsd` subcommand, imported lazily by dsd.cli."""
