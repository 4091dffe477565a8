"""``convert`` and ``report`` never change the model they are given, whatever a trace does on the way.

torchvision's detection models are the case that broke it: ``MultiScaleRoIAlign`` caches its
``scales`` and ``map_levels`` from the first input it sees, so tracing the real instance with torch.fx
left fx Proxies there and every later forward raised ``TraceError``.
"""

import pytest
import torch
import torch.fx
from torch import nn
from torchvision.models.detection import fasterrcnn_resnet50_fpn, maskrcnn_resnet50_fpn

import fastres
from fastres import converter
from fastres.testing import assert_close, randomize_bn, rel_err


def _detector(ctor):
    # Small images and few classes keep the interpreter run short; FrozenBN statistics randomised.
    model = ctor(weights=None, weights_backbone=None, min_size=64, max_size=64, num_classes=5)
    return randomize_bn(model.eval())


def _snapshot(model: nn.Module) -> dict:
    """Every attribute of every submodule: objects by identity, containers one level deep, tensors by
    identity, version and a copy of their values."""
    snap = {}
    for path, m in model.named_modules(remove_duplicate=False):
        attrs = {}
        for key, value in vars(m).items():
            if key in ("_parameters", "_buffers", "_modules"):
                attrs[key] = dict(value)
            elif isinstance(value, (list, tuple)):
                attrs[key] = (type(value), list(value))
            elif isinstance(value, dict):
                attrs[key] = (type(value), dict(value))
            else:
                attrs[key] = value
        snap[path] = attrs
    tensors = {
        name: (t, t._version, t.detach().clone())
        for name, t in list(model.named_parameters()) + list(model.named_buffers())
    }
    return {"modules": snap, "tensors": tensors}


def _assert_unchanged(model: nn.Module, before: dict) -> None:
    after = _snapshot(model)
    assert after["modules"].keys() == before["modules"].keys(), "submodules added or removed"
    for path, attrs in before["modules"].items():
        now = after["modules"][path]
        assert now.keys() == attrs.keys(), f"{path or '(root)'}: attributes {set(now) ^ set(attrs)} changed"
        for key, value in attrs.items():
            new = now[key]
            if isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], type):
                same = new[0] is value[0] and len(new[1]) == len(value[1])
                items_old = value[1].items() if isinstance(value[1], dict) else enumerate(value[1])
                same = same and all(
                    (new[1][k] if isinstance(new[1], list) else new[1].get(k)) is v for k, v in items_old
                )
            elif isinstance(value, dict):
                same = value.keys() == new.keys() and all(new[k] is v for k, v in value.items())
            else:
                same = new is value
            assert same, f"{path or '(root)'}.{key} changed: {value!r} -> {new!r}"
    for name, (t, version, values) in before["tensors"].items():
        now_t = after["tensors"][name][0]
        assert now_t is t and t._version == version and torch.equal(t, values), f"{name} changed"


def _assert_same_detections(out, ref, what):
    assert len(out) == len(ref)
    for o, r in zip(out, ref, strict=True):
        assert o.keys() == r.keys()
        assert torch.equal(o["labels"], r["labels"]), f"{what}: labels differ"
        for key in r:
            if key == "masks":
                # Masks are pasted by bilinear sampling at positions set by the box corners, so a pixel
                # moves with the boxes' 1e-6-relative error times the mask's gradient (8e-4 measured at
                # mask edges): the norm-relative bound is the meaningful check there.
                err = rel_err(o[key], r[key])
                assert err <= 1e-4, f"{what} masks: rel err {err:.3e}"
            elif key != "labels" and r[key].numel():
                # The interpreter's whole-model fp32 bound (DESIGN.md, Numerics); per element, relative
                # to the output's scale (box corners near 0 in a 64-pixel image carry the pixels' error).
                atol = 1e-4 * float(r[key].abs().max())
                assert_close(o[key], r[key], rel=1e-4, atol=atol, rtol=1e-4, what=f"{what} {key}")


@pytest.mark.parametrize("copyable", [True, False], ids=["traced-on-a-copy", "traced-in-place-restored"])
def test_report_leaves_a_detection_model_untouched(copyable, monkeypatch):
    """report() on a Faster R-CNN that has never run: nothing changes, and it still runs afterwards."""
    if not copyable:  # a model that cannot be deep-copied is traced in place and put back
        monkeypatch.setattr(converter, "copy_sharing_tensors", lambda module: None)
    torch.manual_seed(0)
    model = _detector(fasterrcnn_resnet50_fpn)
    before = _snapshot(model)
    rep = fastres.report(model)
    assert rep.convs_total == 64 and len(rep.fused) == 0
    _assert_unchanged(model, before)
    roi_pool = model.roi_heads.box_roi_pool
    assert roi_pool.scales is None and roi_pool.map_levels is None  # still unset: the first forward sets them
    with torch.no_grad():
        out = model([torch.rand(3, 64, 64)])
    assert out[0]["boxes"].shape[-1] == 4


@pytest.mark.parametrize("ctor", [fasterrcnn_resnet50_fpn, maskrcnn_resnet50_fpn], ids=["faster", "mask"])
def test_convert_detection_model(ctor):
    """convert() of a detector that has never run: the original is untouched and both match eager.

    Whole detections are compared with torchvision's default (frozen) BN statistics: with random
    weights and randomised statistics the box decoding is ill-conditioned (eager fp32 against eager
    fp64 differ by 0.29 in the boxes, measured), so there the converted region, the backbone's
    feature maps, is compared at the fp32 bound instead."""
    torch.manual_seed(0)
    model = ctor(weights=None, weights_backbone=None, min_size=64, max_size=64, num_classes=5).eval()
    before = _snapshot(model)
    fast = fastres.convert(model)
    _assert_unchanged(model, before)
    assert fastres.report(fast).convs_fused == 53  # the ResNet-50 body: stem, 48 block convs, 4 shortcuts
    x = torch.rand(1, 3, 64, 64)
    with torch.inference_mode():
        out = fast(list(x))
        ref = model(list(x))
    _assert_same_detections(out, ref, ctor.__name__)
    if ctor is maskrcnn_resnet50_fpn:
        return  # the same backbone as Faster R-CNN's, checked below
    # Same random statistics in both (same module order); the fold cache must see the in-place change.
    randomize_bn(model, seed=1)
    randomize_bn(fast, seed=1)
    with torch.inference_mode():
        feats, ref_feats = fast.backbone(x), model.backbone(x)
    for level in ref_feats:
        atol = 1e-4 * float(ref_feats[level].abs().max())
        assert_close(feats[level], ref_feats[level], rel=1e-4, atol=atol, rtol=1e-4, what=f"FPN {level}")


def test_convert_inplace_traced_model_still_runs():
    """With inplace=True the user's own instance is converted: the trace must leave nothing behind."""
    torch.manual_seed(0)
    model = _detector(fasterrcnn_resnet50_fpn)
    fast = fastres.convert(model, inplace=True)
    assert fast is model
    roi_pool = model.roi_heads.box_roi_pool
    assert roi_pool.scales is None and roi_pool.map_levels is None
    left = [
        f"{path}.{key}"
        for path, m in model.named_modules()
        for key, value in vars(m).items()
        if isinstance(value, torch.fx.Proxy)
        or (isinstance(value, (list, tuple)) and any(isinstance(v, torch.fx.Proxy) for v in value))
    ]
    assert not left, f"fx Proxies left in the model: {left}"
