import sys

from flare_utils.study.cli import main

sys.exit(main())
