"""`python -m serve_app.jobs`: the jobs client (serve_app/jobs/client.py)."""

import sys

from serve_app.jobs.client import main

sys.exit(main())
