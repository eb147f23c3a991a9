"""The operations behind the CLI: typed arguments in, data out. Nothing here prints or
knows about typer; rendering belongs to ``lorastream.cli``."""
