from megadiff.cli import main

raise SystemExit(main())
