import sys

from circuitsae.commands.cli import main

sys.exit(main())
