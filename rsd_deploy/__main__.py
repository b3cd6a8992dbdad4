"""``python -m rsd_deploy``: the command line (also what ``torchrun -m rsd_deploy`` runs)."""

from .cli import main

if __name__ == "__main__":
    main()
