"""`python -m localllm` is the same as the `localllm` command."""

import sys

from localllm.cli.parser import main

sys.exit(main())
