"""``python -m dpg_lightning {fit,validate,...}`` (LightningCLI, :mod:`dpg_lightning.cli`) and
``python -m dpg_lightning {sample,export}`` (:mod:`dpg_lightning.sample`)."""

import sys

from dpg_lightning.cli import main

if __name__ == "__main__":
    if sys.argv[1:2] in (["sample"], ["export"]):
        from dpg_lightning import sample

        getattr(sample, f"{sys.argv[1]}_main")(sys.argv[2:])
    else:
        main()
