"""The folded PyTorch path (CPU tensors, interpreter off) and the triton_op registration it goes with.

Runs in a subprocess: the interpreter switch is read once, when triton is imported.
"""

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import torch, torchvision
    import fastres, fastres.ops
    from fastres.kernels._common import INTERPRET
    from fastres.testing import randomize_bn, rel_err
    assert not INTERPRET
    torch.manual_seed(0)
    m = randomize_bn(torchvision.models.resnet18(num_classes=10)).eval()
    f = fastres.convert(m)
    x = torch.randn(2, 3, 45, 37)
    with torch.inference_mode():
        out = f(x)
    with torch.no_grad():
        ref = m.double()(x.double())
    m.float()
    err = rel_err(out, ref)
    assert err < 1e-4, err
    args = (torch.randn(2, 4, 6, 6), torch.randn(8, 4, 3, 3), torch.randn(8), torch.randn(2, 8, 6, 6),
            [1, 1], [1, 1], [1, 1], 1, True)
    torch.library.opcheck(torch.ops.fastres.conv_bias_act.default, args)
    pool_args = (torch.randn(1, 4, 7, 7), [3, 3], [2, 2], [1, 1])
    torch.library.opcheck(torch.ops.fastres.max_pool2d.default, pool_args)
    torch.library.opcheck(torch.ops.fastres.global_avg_pool.default, (torch.randn(1, 4, 3, 5),))
    with torch.no_grad():
        c = torch.compile(f, backend="aot_eager", fullgraph=True)(x)
    assert rel_err(c, ref) < 1e-4
    print("OK", err)
""")


def test_cpu_path_without_interpreter_matches_eager_and_passes_opcheck():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.startswith("OK")
