"""``python -m intelligence``: the command line is in ``intelligence/cli.py``."""

if __name__ == "__main__":
    import signal

    from gateway.startsignals import stop_at_once_while_starting

    # It has nothing to reload: SIGHUP stops it too (serve() drains on it once serving).
    stop_at_once_while_starting((signal.SIGINT, signal.SIGHUP, signal.SIGTERM))
    from intelligence.cli import main

    raise SystemExit(main())
