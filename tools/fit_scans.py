"""Fit the template to raw scans and write registrations: see ``tempeh.cli.fit_scans``."""
from tempeh.cli.fit_scans import main

raise SystemExit(main())
