"""``python -m hwr_batch`` runs the command line."""

from .cli import main

if __name__ == "__main__":  # not when a worker process started by spawn imports the main module (Dask's)
    main()
