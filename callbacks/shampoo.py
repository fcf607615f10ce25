"""Lightning callback that schedules, checkpoints, shuts down and logs :class:`~lightning_shampoo.Shampoo`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.types import STEP_OUTPUT
from typing_extensions import override

from lightning_shampoo import EveryNSteps, OnRequest, Shampoo, register_strategies

register_strategies()  # the Lightning-facing modules make strategy="shampoo_ddp" / "shampoo_fsdp" work


class ShampooCallback(Callback):
    r"""Drives every :class:`~lightning_shampoo.Shampoo` optimizer of the Trainer.

    - **Refresh schedule**: with ``every_n_steps`` the callback owns the schedule: it installs
      ``EveryNSteps(every_n_steps, every_n_steps)`` as each optimizer's refresh policy (refreshes at the
      optimizer steps ``t`` with ``t % every_n_steps == 0``), replacing the optimizer's own. ``t`` is the
      optimizer's own step count, so neither the micro-batches of gradient accumulation nor the steps the
      AMP grad scaler skips (``optimizer.step()`` never runs) count. With ``on_epoch_end`` it also
      requests a refresh (``optimizer.request_refresh()``) for the first step after every training epoch.
      Without either, the optimizer's own policy rules alone.
    - **Checkpoints**: in-flight refreshes are drained (``optimizer.drain()``) before the optimizer state is
      taken, so a checkpoint holds their results and a resumed run need not recompute them.
    - **Shutdown**: ``optimizer.close()`` at the end of fit and when fit raises; on Ctrl-C without waiting
      for the refresh in flight.
    - **Logging**: ``optimizer.metrics()`` under ``shampoo/`` (``shampoo{i}/`` with several Shampoo
      optimizers) to the Trainer's loggers; the ``progress_bar`` subset also to the progress bar.

    Example::

        model = MyModule(optimizer=lambda params: Shampoo(params))
        trainer = Trainer(callbacks=[ShampooCallback(every_n_steps=50, on_epoch_end=True)])

    Args:
        every_n_steps: refresh at every ``every_n_steps``-th optimizer step (the callback's policy replaces
            the optimizer's); ``None``: keep the optimizer's policy.
        on_epoch_end: request a refresh at the end of every training epoch (it runs at the next step).
        progress_bar: names of ``metrics()`` entries also shown on the progress bar (absent ones are skipped).
    """

    def __init__(
        self,
        every_n_steps: int | None = None,
        on_epoch_end: bool = False,
        progress_bar: Sequence[str] = ("refreshes", "roots_rejected", "staleness"),
    ) -> None:
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"every_n_steps must be None or >= 1, got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self.on_epoch_end = on_epoch_end
        self.progress_bar = tuple(progress_bar)
        self._optimizers: dict[int, Shampoo] = {}

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Finds the Shampoo optimizers among ``trainer.optimizers`` and installs the schedule.

        Args:
            trainer: the running Trainer.
            pl_module: the module being trained.
        """
        self._optimizers = {i: opt for i, opt in enumerate(trainer.optimizers) if isinstance(opt, Shampoo)}
        if not self._optimizers:
            names = ", ".join(type(opt).__name__ for opt in trainer.optimizers) or "none"
            rank_zero_warn(
                f"ShampooCallback found no lightning_shampoo.Shampoo among the Trainer's optimizers "
                f"({names}), so it schedules and logs nothing. Return a Shampoo from configure_optimizers or "
                "remove the callback."
            )
        for index, optimizer in self._optimizers.items():
            if self.every_n_steps is not None:
                policy = EveryNSteps(self.every_n_steps, self.every_n_steps)
                if not isinstance(optimizer.policy, OnRequest) and optimizer.policy != policy:
                    rank_zero_info(
                        f"ShampooCallback(every_n_steps={self.every_n_steps}) owns the refresh schedule: it "
                        f"replaces optimizer {index}'s refresh_policy ({optimizer.policy}) with {policy}."
                    )
                optimizer.set_refresh_policy(policy)
            elif not self.on_epoch_end and isinstance(optimizer.policy, OnRequest):
                rank_zero_warn(
                    f"Optimizer {index} has refresh_policy=OnRequest() and ShampooCallback requests no "
                    "refresh, so the preconditioners are never computed. Set every_n_steps and/or "
                    "on_epoch_end."
                )
            lag, period = optimizer.refresh_options.lag, self.every_n_steps
            if optimizer.refresh_options.mode == "async" and period is not None and lag > period:
                # The default lag is precondition_frequency, which knows nothing of this schedule.
                rank_zero_warn(
                    f"Optimizer {index} installs its roots refresh_lag={lag} steps after their snapshot, "
                    f"longer than every_n_steps={period}: each root is older than the next "
                    f"refresh when it is installed, and a run shorter than {lag} steps is never "
                    f"preconditioned. Pass refresh_lag <= {period} to the optimizer."
                )

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Requests a refresh of every Shampoo optimizer for the first step after this epoch.

        Args:
            trainer: the running Trainer.
            pl_module: the module being trained.
        """
        if self.on_epoch_end:
            for optimizer in self._optimizers.values():
                optimizer.request_refresh()

    @override
    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: STEP_OUTPUT,
        batch: Any,
        batch_idx: int,
    ) -> None:
        """Logs every optimizer's ``metrics()``; the ``progress_bar`` subset also goes to the progress bar.

        Args:
            trainer: the running Trainer.
            pl_module: the module being trained.
            outputs: the training step's outputs.
            batch: the training batch.
            batch_idx: index of the batch in the epoch.
        """
        for index, optimizer in self._optimizers.items():
            prefix = "shampoo" if len(self._optimizers) == 1 else f"shampoo{index}"
            metrics = {f"{prefix}/{name}": value for name, value in optimizer.metrics().items()}
            shown = {f"{prefix}/{name}" for name in self.progress_bar}
            for on_bar in (True, False):
                selected = {key: value for key, value in metrics.items() if (key in shown) == on_bar}
                if selected:
                    pl_module.log_dict(selected, on_step=True, on_epoch=False, prog_bar=on_bar)

    @override
    def state_dict(self) -> dict[str, Any]:
        """The schedule, identical on every rank; first drains in-flight refreshes.

        Lightning collects the callbacks' state just before the optimizers' (``dump_checkpoint``), so this
        is the last hook before ``optimizer.state_dict()`` is taken.
        """
        for optimizer in self._optimizers.values():
            optimizer.drain()
        return {"every_n_steps": self.every_n_steps, "on_epoch_end": self.on_epoch_end}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Says so when the resumed schedule differs from the checkpoint's.

        Args:
            state_dict: what :meth:`state_dict` returned in the saved run.
        """
        saved = (state_dict.get("every_n_steps"), state_dict.get("on_epoch_end"))
        if saved != (self.every_n_steps, self.on_epoch_end):
            rank_zero_info(
                f"ShampooCallback: the checkpoint was written with every_n_steps={saved[0]}, "
                f"on_epoch_end={saved[1]}; this run has every_n_steps={self.every_n_steps}, "
                f"on_epoch_end={self.on_epoch_end}. Pass the saved values to resume the same trajectory."
            )

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Shuts down every Shampoo optimizer's refresh engine.

        Args:
            trainer: the running Trainer.
            pl_module: the module being trained.
        """
        self._close()

    @override
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        """Stops every Shampoo optimizer's refresh worker, so no worker outlives a failed fit; on Ctrl-C
        without waiting for the refresh it computes, so the process ends at once.

        Args:
            trainer: the running Trainer.
            pl_module: the module being trained.
            exception: what fit raised.
        """
        self._close(wait=not isinstance(exception, KeyboardInterrupt))

    def _close(self, wait: bool = True) -> None:
        for optimizer in self._optimizers.values():
            optimizer.close(wait=wait)
        self._optimizers = {}
