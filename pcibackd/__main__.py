import sys

from pcibackd.cli import main

sys.exit(main())
