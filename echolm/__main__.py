import sys

from echolm.cli import main

sys.exit(main())
