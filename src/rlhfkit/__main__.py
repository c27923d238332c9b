"""``python -m rlhfkit`` and ``accelerate launch -m rlhfkit``: the ``rlhfkit`` command."""

from rlhfkit.cli import main

if __name__ == "__main__":
    main()
