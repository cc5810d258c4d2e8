from packserve.commands import main

raise SystemExit(main())
