"""``python -m tempeh.bench [--quick] [--only a,b] [--out benchmarks/] [--timeout S]``: run the
benchmark suite (see :mod:`tempeh.bench.runner`) and write results.json and results.md."""
import sys

from tempeh.bench.runner import main

sys.exit(main())
