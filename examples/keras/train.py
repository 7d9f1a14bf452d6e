"""Keras 3 on the torch backend: a small MLP regressing a synthetic target.
ModelCheckpoint saves the whole model (weights + optimizer) to
epoch-NNN.keras in the checkpoint directory after every epoch;
ckpt.keras.CkptCallback, placed after it, commits each save (and, on a
preemption warning, saves preempted.keras at the next batch end and commits);
ckpt.keras.resume_path() picks the newest whole .keras file. On its first
attempt the run fails at step FAIL_AT_STEP, in the middle of an epoch, with
ckpt.RecoverableError (exit 75); the retry reloads the last save, resumes at
its epoch and ends with the same weights (the data order is fixed).
"""

import json
import os

os.environ.setdefault("KERAS_BACKEND", "torch")

import keras
import numpy as np

import ckpt
import ckpt.keras

EPOCHS = int(os.environ.get("EPOCHS", "4"))
BATCH, SAMPLES, SEED = 32, 256, 0
STEPS_PER_EPOCH = SAMPLES // BATCH
FAIL_AT_STEP = int(os.environ.get("FAIL_AT_STEP", str(EPOCHS * STEPS_PER_EPOCH // 2 + 3)))


class FailOnce(keras.callbacks.Callback):
    """The simulated fault: attempt 1 dies at FAIL_AT_STEP."""

    def on_train_batch_end(self, batch, logs=None) -> None:
        step = int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))
        if ckpt.checkpoint().attempt == 1 and step == FAIL_AT_STEP:
            print(f"step {step}: simulated failure", flush=True)
            raise ckpt.RecoverableError(f"simulated failure at step {step}")


keras.utils.set_random_seed(SEED)
rng = np.random.default_rng(SEED)
x = rng.standard_normal((SAMPLES, 8)).astype("float32")
y = (np.sin(x[:, :1] * 2) + 0.5 * x[:, 1:2] * x[:, 2:3]).astype("float32")

cp = ckpt.checkpoint()
resume = ckpt.keras.resume_path(cp.path)
if resume:
    model = keras.saving.load_model(resume)
else:
    model = keras.Sequential(
        [keras.Input((8,)), keras.layers.Dense(32, activation="tanh"), keras.layers.Dense(1)]
    )
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
start_step = int(keras.ops.convert_to_numpy(model.optimizer.iterations))
print(
    f"attempt {cp.attempt}: starting from step {start_step} "
    f"({os.path.basename(resume) if resume else 'no checkpoint'})",
    flush=True,
)
commits = ckpt.keras.CkptCallback(cp.path)
model.fit(
    x,
    y,
    batch_size=BATCH,
    epochs=EPOCHS,
    initial_epoch=start_step // STEPS_PER_EPOCH,  # a mid-epoch save redoes that epoch
    shuffle=False,
    verbose=0,
    callbacks=[
        keras.callbacks.ModelCheckpoint(str(cp.path / "epoch-{epoch:03d}.keras")),
        commits,  # after ModelCheckpoint: commits in the same epoch-end hook
        FailOnce(),
    ],
)

final = float(model.evaluate(x, y, batch_size=SAMPLES, verbose=0))
steps = int(keras.ops.convert_to_numpy(model.optimizer.iterations))
result = {
    "loss": final,
    "steps": steps,
    "attempt": cp.attempt,
    "start_step": start_step,
    "snapshot": commits.last_snapshot,  # the last commit: holds the final checkpoint
}
print(f"done: {steps} steps, final loss {final:.6f}")
if os.environ.get("RESULT_FILE"):
    with open(os.environ["RESULT_FILE"], "w") as f:
        json.dump(result, f)
