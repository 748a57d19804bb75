"""``python -m dpg_lightning <command>``: see :func:`dpg_lightning.cli.main`."""

from dpg_lightning.cli import main

if __name__ == "__main__":
    main()
