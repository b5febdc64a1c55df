"""No host syncs in the training loop: after the first step, no method's step reads a tensor value on the host.

On a GPU, `loss.item()`, `float(t)`, `if t:` and boolean-mask indexing make the CPU wait for the device
once per call, which starves the GPU of queued work. The ops that do so reach torch's dispatcher as
`_local_scalar_dense` (item/float/bool), `nonzero`, `masked_select`, `unique` or `index` with a boolean
mask, so a dispatch mode sees them on the CPU too. torch's AdamW is fused (train.core.make_optimizer):
the for-loop AdamW reads each tensor's step count with .item() (a CPU tensor there, so no device sync,
but indistinguishable from one here). The one read by design is LossLog.flush's batched `.cpu()` every
`log_every` steps; a device-to-host copy is invisible on a CPU-only machine, so this test covers the
per-value reads, not that copy.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conceptbench.methods import get_method
from conceptbench.train import TrainContext, train, train_config

SYNCING = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique", "_unique2", "unique_consecutive"}


class HostReads(TorchDispatchMode):
    """Records the syncing ops dispatched while `armed`."""

    def __init__(self):
        super().__init__()
        self.armed, self.reads = False, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        masked = name in ("index", "index_put", "index_put_") and any(
            t is not None and t.dtype == torch.bool for t in (args[1] if len(args) > 1 else ()))
        if self.armed and (name in SYNCING or masked):
            self.reads.append(name)
        return func(*args, **(kwargs or {}))


def specs(dreambooth_spec, instance_dir, caption_dir):
    """Each method's spec from its own test module (LoRA's inline there too), run 4 steps with no log point before the end."""
    from test_custom_diffusion import SPEC as CUSTOM_DIFFUSION
    from test_textual_inversion import SPEC as TEXTUAL_INVERSION

    lora = {"experiment": "lora", "variant": "rank-4", "method": "lora", "seed": 0, "resolution": 64,
            "train": {"batch_size": 2}, "args": {"rank": 4, "snr_gamma": 5.0}}
    out = {"dreambooth": (dreambooth_spec, instance_dir), "textual_inversion": (TEXTUAL_INVERSION, instance_dir),
           "custom_diffusion": (CUSTOM_DIFFUSION, instance_dir), "lora": (lora, caption_dir)}
    for spec, _ in out.values():
        spec["train"] = {**spec["train"], "steps": 4, "learning_rate": 1e-4, "log_every": 100, "checkpoint_every": 0}
    return out


@pytest.mark.parametrize("name", ["dreambooth", "textual_inversion", "custom_diffusion", "lora"])
def test_steps_after_the_first_read_nothing_on_the_host(name, tiny_pipeline_dir, instance_dir, class_dir,
                                                         caption_dir, dreambooth_spec, tmp_path):
    spec, data = copy.deepcopy(specs(dreambooth_spec, instance_dir, caption_dir)[name])
    method = get_method(name)(spec["args"])
    ctx = TrainContext(spec=spec, base_model=tiny_pipeline_dir, data_dir=data, class_dir=class_dir,
                       device=torch.device("cpu"), mixed_precision="no")
    mode = HostReads()

    def arm(step: int) -> None:
        mode.armed = step < spec["train"]["steps"]  # steps 2..n-1; the last step's end flushes the loss log

    with mode:
        summary = train(method, ctx, train_config(spec), tmp_path / "work", on_step_end=arm)
    assert summary["steps"] == 4
    assert mode.reads == []


def test_the_probe_sees_the_reads_it_is_meant_to_catch():
    x = torch.randn(8)
    with HostReads() as mode:
        mode.armed = True
        x.sum().item()
        bool(x.max() > 0)
        x[x > 0]
        torch.nonzero(x)
        x[torch.tensor([0, 1])]  # integer indexing needs no sync
    assert mode.reads == ["_local_scalar_dense", "_local_scalar_dense", "index", "nonzero"]
