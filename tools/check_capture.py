from tempeh.cli.check_capture import main

raise SystemExit(main())
