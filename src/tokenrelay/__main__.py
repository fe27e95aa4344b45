import sys

from tokenrelay.cli import main

sys.exit(main())
