from nmsparse.cli import main

raise SystemExit(main())
