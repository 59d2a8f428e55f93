"""``python -m gateway``: the command line is in ``gateway/cli.py``."""

if __name__ == "__main__":
    import signal

    from gateway.startsignals import stop_at_once_while_starting

    stop_at_once_while_starting((signal.SIGINT, signal.SIGTERM))
    # A reload sent while the gateway starts would meet SIGHUP's default action and end it: held
    # pending until serve() or the supervisor installs its handler, which then takes it; `up`
    # takes it as a stop.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
    from gateway.cli import main

    raise SystemExit(main())
