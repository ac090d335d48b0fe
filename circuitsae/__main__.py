import sys

from circuitsae.cli import main

sys.exit(main())
