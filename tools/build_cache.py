"""Pack capture frames into one HDF5 file: see ``tempeh.cli.build_cache``."""
from tempeh.cli.build_cache import main

raise SystemExit(main())
