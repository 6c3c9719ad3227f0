import sys

if sys.argv[1:2] == ["gpu"]:  # the GPU check starts on a bare Python, before anything else is importable
    from bench.gpu import main as gpu_main

    raise SystemExit(gpu_main(sys.argv[2:]))

from bench.cli import main

raise SystemExit(main())
