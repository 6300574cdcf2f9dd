from tempeh.cli.train import main

raise SystemExit(main())
