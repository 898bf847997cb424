"""`python -m serve_app.admin`: the admin CLI's documented command; the CLI itself is serve_app/auth/cli.py."""

import sys

from serve_app.auth.cli import main

if __name__ == "__main__":
    sys.exit(main())
