import sys

from feed.app.cli import main

sys.exit(main())
