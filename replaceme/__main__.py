from replaceme.cli import entry

entry()
