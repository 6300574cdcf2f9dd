"""Write a synthetic capture folder: see ``tempeh.cli.make_synthetic``."""
from tempeh.cli.make_synthetic import main

if __name__ == "__main__":  # guard: --workers uses spawned processes that import this file
    raise SystemExit(main())
