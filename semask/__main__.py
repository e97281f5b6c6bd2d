"""`python -m semask` runs the command line (see `semask.apps.cli`)."""
from semask.apps.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
