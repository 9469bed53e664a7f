from retool.cli import run

run()
