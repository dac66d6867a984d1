from surgeon.cli import run

run()
