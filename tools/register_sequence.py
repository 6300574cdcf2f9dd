from tempeh.cli.register_sequence import main

raise SystemExit(main())
