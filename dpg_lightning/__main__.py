"""``python -m dpg_lightning``: see :mod:`dpg_lightning.cli`."""

from dpg_lightning.cli import main

if __name__ == "__main__":
    main()
