"""``python -m sync`` is the same as the ``amberflo-sync`` command."""

from sync.cli import main

if __name__ == "__main__":
    main()
