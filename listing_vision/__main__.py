"""`python -m listing_vision`. The command line is imported only when run: a process spawned
from this one (a decode process, `compare`'s) imports this module as its parent's main, and
needs none of it."""

if __name__ == "__main__":
    from listing_vision.cli import main

    main()
