"""``python -m gateway``: the command line is in ``gateway/cli.py``."""

if __name__ == "__main__":
    import os
    import signal

    # Until the gateway installs its own handlers (the imports below take most of a second), a
    # stop ends it quietly: Python's SIGINT handler printed a KeyboardInterrupt traceback, and as
    # PID 1 in a container, where the kernel drops signals left to their default action, a
    # SIGTERM was ignored until the grace period's SIGKILL. One ignored at start stays ignored.
    def _stop_now(signum: int, _frame: object) -> None:
        os._exit(128 + signum)

    for _signum in (signal.SIGTERM, signal.SIGINT):
        if signal.getsignal(_signum) in (signal.SIG_DFL, signal.default_int_handler):
            signal.signal(_signum, _stop_now)
    # And a reload sent while the gateway starts would meet SIGHUP's default action and end it:
    # held pending until serve() or the supervisor installs its handler, which then takes it;
    # `up` takes it as a stop.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
    from gateway.cli import main

    raise SystemExit(main())
