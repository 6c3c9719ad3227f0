from stageformer.cli import main

raise SystemExit(main())
