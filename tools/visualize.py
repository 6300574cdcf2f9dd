from tempeh.cli.visualize import main

raise SystemExit(main())
