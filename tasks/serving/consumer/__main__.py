"""``python -m tasks.serving.consumer`` = ``mlpipe stream``."""

import sys

from tasks.serving.consumer.cli import main

if __name__ == "__main__":
    sys.exit(main())
