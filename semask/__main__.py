"""`python -m semask` runs the command line (see `semask.cli`)."""
from semask.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
