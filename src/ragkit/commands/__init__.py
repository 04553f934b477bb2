"""The ``ragkit`` sub-commands, one module each (``configure_parser(parser)`` and ``run(args) -> int``)."""
