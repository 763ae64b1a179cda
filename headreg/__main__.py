"""``python -m headreg`` (and ``torchrun -m headreg``) runs the CLI."""

from headreg.cli import main

if __name__ == "__main__":
    main()
