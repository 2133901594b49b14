import sys

from crystal.entry import main

sys.exit(main())
