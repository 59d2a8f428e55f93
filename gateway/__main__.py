"""``python -m gateway``: the command line is in ``gateway/cli.py``."""

if __name__ == "__main__":
    import signal

    # Before the imports, which take most of a second: a reload sent while the gateway starts
    # would meet SIGHUP's default action and end it. Held pending until serve() or the
    # supervisor installs its handler, which then takes it; `up` installs its stop handler.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
    from gateway.cli import main

    raise SystemExit(main())
