from pipeline.cli.commands import entry

entry()
