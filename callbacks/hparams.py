"""Log the module's hyperparameters as nested plain values, so loggers can filter by them.

``DPGModule`` keeps its settings as dataclasses (``SamplingConfig``...), which Lightning's
automatic hyperparameter logging turns into one opaque string per section: W&B then cannot
filter or group runs by ``sampling.samples_per_prompt``. This callback re-logs them as nested
dicts at the start of training, after Lightning's own logging (the later value replaces the
string).
"""

from __future__ import annotations

import lightning as L

from dpg_lightning.run.checkpoint_config import plain


class StructuredHparams(L.Callback):
    """At the start of training, log ``pl_module.hparams`` with dataclasses expanded.

    ``on_train_start`` runs after Lightning's automatic hyperparameter logging (``on_fit_start``
    runs before it, and would be overwritten by the strings).
    """

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        params = plain(dict(pl_module.hparams))
        metric = getattr(pl_module, "metric", None)
        if metric is not None and "metric" not in params:  # DPGModule keeps it out of hparams
            params["metric"] = type(metric).__name__
        for logger in trainer.loggers:
            logger.log_hyperparams(params)
