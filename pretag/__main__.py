import sys

from pretag.cli import main

sys.exit(main())
