from tempeh.cli.train import run

run()
