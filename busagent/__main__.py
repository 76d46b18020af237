import sys

from busagent.cli import main

sys.exit(main())
