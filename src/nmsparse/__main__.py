from nmsparse.cli.dispatch import main

raise SystemExit(main())
