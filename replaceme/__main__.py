from replaceme.cli import main

raise SystemExit(main())
