"""Exit codes and JSON output, shared by every verb."""

from __future__ import annotations

import json

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def print_json(value) -> None:
    print(json.dumps(value, indent=2))
