from tempeh.cli.evaluate import main

raise SystemExit(main())
