"""Lightning on the CPU: a small MLP regressing a synthetic target. A
ModelCheckpoint saves into the checkpoint directory after every epoch;
ckpt.lightning.CkptCallback commits each save (and, on a preemption warning,
saves and commits at the next batch end); ckpt.lightning.resume_path() picks
the newest complete .ckpt for fit(ckpt_path=...). On its first attempt the run
fails at step FAIL_AT_STEP, in the middle of an epoch, with
ckpt.RecoverableError (exit 75): the retry redoes that epoch from the last
save. The data order is fixed, so the retry ends with the same weights.
"""

import json
import os
import warnings

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import ckpt
import ckpt.lightning

EPOCHS = int(os.environ.get("EPOCHS", "4"))
BATCH, SAMPLES, SEED = 32, 256, 0
FAIL_AT_STEP = int(os.environ.get("FAIL_AT_STEP", str(EPOCHS * (SAMPLES // BATCH) // 2 + 3)))

warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*exists and is not empty.*")


class Regressor(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-2)


class FailOnce(pl.Callback):
    """The simulated fault: attempt 1 dies at FAIL_AT_STEP."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if ckpt.checkpoint().attempt == 1 and trainer.global_step == FAIL_AT_STEP:
            print(f"step {trainer.global_step}: simulated failure", flush=True)
            raise ckpt.RecoverableError(f"simulated failure at step {trainer.global_step}")


pl.seed_everything(SEED, verbose=False)
x = torch.randn(SAMPLES, 8)
y = torch.sin(x[:, :1] * 2) + 0.5 * x[:, 1:2] * x[:, 2:3]
loader = DataLoader(TensorDataset(x, y), batch_size=BATCH, shuffle=False)
model = Regressor()

cp = ckpt.checkpoint()
resume = ckpt.lightning.resume_path()
start_step = torch.load(resume, weights_only=False)["global_step"] if resume else 0
print(
    f"attempt {cp.attempt}: starting from step {start_step} "
    f"({os.path.basename(resume) if resume else 'no checkpoint'})",
    flush=True,
)
commits = ckpt.lightning.CkptCallback()  # after ModelCheckpoint's saves: commit
trainer = pl.Trainer(
    max_epochs=EPOCHS,
    accelerator="cpu",
    devices=1,
    logger=False,
    enable_progress_bar=False,
    enable_model_summary=False,
    deterministic=True,
    callbacks=[
        ModelCheckpoint(dirpath=cp.path, filename="{epoch}-{step}", save_top_k=-1),
        commits,
        FailOnce(),
    ],
)
trainer.fit(model, loader, ckpt_path=resume)

with torch.no_grad():
    final = nn.functional.mse_loss(model.net(x), y).item()
result = {
    "loss": final,
    "epochs": trainer.current_epoch,
    "steps": trainer.global_step,
    "attempt": cp.attempt,
    "start_step": start_step,
    "snapshot": commits.last_snapshot,  # the last commit: holds the final checkpoint
}
print(f"done: {result['epochs']} epochs, {result['steps']} steps, final loss {final:.6f}")
if os.environ.get("RESULT_FILE"):
    with open(os.environ["RESULT_FILE"], "w") as f:
        json.dump(result, f)
