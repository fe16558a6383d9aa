import sys

from .cli import main

if __name__ == "__main__":
    argv = sys.argv[1:]
    # `python -m lbw_guard.experiments [options]` means the stress command.
    sys.exit(main(argv if argv[:1] == ["stress"] else ["stress", *argv]))
