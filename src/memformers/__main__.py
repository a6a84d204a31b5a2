import sys

from memformers.cli import main

sys.exit(main())
