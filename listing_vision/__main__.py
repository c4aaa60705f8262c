"""`python -m listing_vision`, and the `listing-vision` console script's entry point. The command
line is imported only when run: a process spawned from this one (a decode process, `compare`'s)
imports its parent's main module (this one, or the console script, which imports `main` from
here) and needs none of it."""


def main() -> None:
    """Run the command line."""
    from listing_vision.cli import main as run_command_line

    run_command_line()


if __name__ == "__main__":
    main()
