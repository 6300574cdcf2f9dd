"""Run the CPU demo end to end (make demo): see ``tempeh.cli.demo``."""
from tempeh.cli.demo import main

if __name__ == "__main__":  # guard: data generation uses spawned processes that import this file
    raise SystemExit(main())
