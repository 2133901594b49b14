import sys

from crystal.cli import main

sys.exit(main())
