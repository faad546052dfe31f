"""``python -m unionseg ...``: the ``unionseg`` command, for a job script or ``torchrun -m unionseg`` where the
virtual environment's ``bin`` folder is not on the PATH."""

from unionseg.cli import main

if __name__ == "__main__":
    main()
