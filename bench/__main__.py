import sys

from tokenrelay.bench.harness import main

sys.exit(main())
