import sys

from feed.cli import main

sys.exit(main())
