from kinod.cli import main

raise SystemExit(main())
