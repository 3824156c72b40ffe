"""Helpers for tests that send signals to child processes."""
import signal


def default_signals() -> None:
    """``preexec_fn`` for ``subprocess.Popen``: the child starts with the default SIGINT and SIGTERM
    dispositions (so Python installs its KeyboardInterrupt handler), even when pytest itself was
    launched with them ignored (``nohup``, a background job of a non-interactive shell), which the
    child would otherwise inherit."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
