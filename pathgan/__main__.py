import sys

from pathgan.cli import main

sys.exit(main())
