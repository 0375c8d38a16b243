from mmser.cli import main

raise SystemExit(main())
