"""``python -m flywheel_cli``: the same as the ``flywheel`` command."""

from flywheel_cli.app import main

if __name__ == "__main__":
    main()
