#!/usr/bin/env python
"""Django's command-line utility for Dex."""

import os
import sys


def main() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "dexweb.settings")
    if sys.argv[1:2] == ["embedded"]:
        # Settings start the embedded servers on import; the command that inspects and stops them must not.
        os.environ.setdefault("DEX_EMBEDDED_AUTOSTART", "0")
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)


if __name__ == "__main__":
    main()
