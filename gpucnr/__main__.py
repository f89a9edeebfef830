"""`python -m gpucnr` and the `gpucnr` command."""

import gc
import signal
import sys

#: Ctrl-C before a command began (importing, parsing the options): nothing to continue
STARTING = "gpucnr: interrupted (SIGINT) while starting: nothing was done; run the same command again"


def main() -> int:
    """The `gpucnr` command: its exit status (`gpucnr.cli.main`).

    Ctrl-C while the command's modules are still importing (a fraction of a second, more under load) is one line
    and exit 130, not a traceback; once the command has returned, a late Ctrl-C is ignored while Python shuts
    down — the command's work and its exit status are already decided, and a KeyboardInterrupt raised in an exit
    handler would only print "Exception ignored" under the command's last line."""
    try:
        from gpucnr import cli
    except KeyboardInterrupt:
        print(STARTING, file=sys.stderr)
        return 130
    cli.FREEZE_AFTER_IMPORTS = True  # NB: this process is the command's own (`cli._imported`)
    code = cli.main()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # NB: Python's shutdown ends with a cycle collection that walks every object the imports made (pandas, xarray,
    # Numba's registries: ~0.3 s of every `gpucnr run` here) only to free memory the process hands back anyway;
    # frozen objects are skipped. Exit handlers still run and files still close: only that walk is saved.
    gc.freeze()
    return code


if __name__ == "__main__":
    sys.exit(main())
