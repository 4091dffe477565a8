"""``tune_model``: autotune every conv shape of a model on this GPU and write a config table.

The table is what ships in ``fastres/configs/<arch>.json`` (format and lookup order:
``fastres.kernels.tuning``). A GPU script regenerates it, for example for fp16 and fp32 at batch 1
and 32 (entries are keyed by M bucket, so each batch size and resolution adds its own)::

    import torch, torchvision, fastres
    from fastres.tuning import tune_model

    for dtype in (torch.float16, torch.float32):
        for batch in (1, 32):
            model = torchvision.models.resnet50().eval().cuda().to(dtype)
            x = torch.randn(batch, 3, 224, 224, device="cuda", dtype=dtype)
            tune_model(model, x, "fastres/configs")          # merges into fastres/configs/sm_90.json
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from fastres.kernels import tuning as _ktuning
from fastres.kernels._common import INTERPRET


def tune_model(
    model: nn.Module,
    example_input: torch.Tensor,
    out_path: str | os.PathLike,
    *,
    merge: bool = True,
    verbose: bool = True,
) -> Path:
    """Time the candidate configs of every conv the converted ``model`` launches on ``example_input``
    (tables and the autotune cache are ignored), keep the fastest per shape, and write the table.

    ``out_path``: a ``.json`` file named after the GPU arch (``sm_90.json``), or a folder to write
    ``<arch>.json`` into. With ``merge`` (default) entries already in the file stay unless retuned.
    ``model`` is converted first (a copy; converting a converted model changes nothing) and run in
    eval mode under ``torch.inference_mode``; it and ``example_input`` must be on the same CUDA device
    with the same dtype. Returns the path written.

    >>> tune_model(resnet50().eval().cuda().half(), x_fp16, "fastres/configs")   # doctest: +SKIP
    """
    if not isinstance(example_input, torch.Tensor) or example_input.device.type != "cuda" or INTERPRET:
        raise RuntimeError(
            "tune_model times kernels on a GPU: example_input must be a CUDA tensor, "
            "with TRITON_INTERPRET unset"
        )
    from fastres.converter import convert

    fast = convert(model).eval()
    arch = _ktuning.device_arch(example_input.device)
    path = Path(out_path)
    if path.suffix != ".json":
        path = path / f"{arch}.json"
    with torch.inference_mode(), _ktuning.tune_session() as session:
        fast(example_input)
        torch.cuda.synchronize(example_input.device)
    if not session:
        raise RuntimeError(
            "tune_model: no fused conv kernel ran; is the model a ResNet that fastres.convert fuses "
            "(fastres.report(model) says), with weights on the input's device and dtype?"
        )
    _ktuning.write_table(path, arch, session, tuned_on=_ktuning.environment(), merge=merge)
    _ktuning.clear_cache()  # this process now reads the new table too
    if verbose:
        print(f"tune_model: {len(session)} conv shapes tuned on {arch}, written to {path}")
        for key, (cfg, ms) in sorted(session.items()):
            print(f"  {key:<56} {ms * 1e3:9.1f} us  {cfg}")
    return path
