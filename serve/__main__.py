from packserve.cli import main

raise SystemExit(main())
