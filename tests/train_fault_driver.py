"""Runs `cxrlens train` with a fault injected (see tests/test_faults_train.py)."""
import io
import os
import signal
import sys
import time

mode, at = os.environ.get("CXRLENS_FAULT", ""), int(os.environ.get("CXRLENS_FAULT_AT", "0"))
if mode == "pause":
    from cxrlens import train as T

    original = T.RunFolderWriter.on_train_batch_end

    def announce_and_wait(self, trainer, module, outputs, batch, batch_idx):
        original(self, trainer, module, outputs, batch, batch_idx)
        if trainer.global_step == at:
            print(f"PAUSED AT STEP {at}", flush=True)
            time.sleep(600)

    T.RunFolderWriter.on_train_batch_end = announce_and_wait
elif mode == "tear":
    import torch

    real_save, calls = torch.save, []

    def save_half_then_die(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) < at:
            return real_save(obj, f, *args, **kwargs)
        buffer = io.BytesIO()
        real_save(obj, buffer)
        f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    torch.save = save_half_then_die
sys.argv = ["cxrlens", *sys.argv[1:]]
from cxrlens.cli import main  # noqa: E402

main()
