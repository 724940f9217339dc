"""Starting child processes that a test stops with a signal."""

import signal


def default_sigint() -> None:
    """`preexec_fn` for a child that a test interrupts with SIGINT: the default disposition, so Python raises
    KeyboardInterrupt there. A job started in the background by a non-interactive shell (`make test &`, nohup,
    some CI runners) ignores SIGINT, and every process it starts inherits that: the signal would be lost."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
