"""One module per ``vol3d`` subcommand: ``HELP``, ``DESCRIPTION``, ``add_arguments(parser)``, ``run(args)``."""
