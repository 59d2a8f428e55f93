"""``python -m gateway``: the command line is in ``gateway/cli.py``."""

if __name__ == "__main__":
    from gateway.cli import main

    raise SystemExit(main())
