"""``fastres.report``: on a model before conversion it says what convert would make of each part; on a
converted model it names the original layer types and what each became."""

import torchvision
from torch import nn

import fastres


def test_report_of_a_converted_model_names_the_originals():
    fast = fastres.convert(torchvision.models.resnet18().eval())
    entries = {e.path: e for e in fastres.report(fast).entries}
    expected = {
        "conv1": ("Conv2d", "FusedStem"),
        "avgpool": ("AdaptiveAvgPool2d", "FusedHead"),
        "layer1.0": ("BasicBlock", "FusedBasicBlock"),
        "layer4.1": ("BasicBlock", "FusedBasicBlock"),
    }
    for path, (original, became) in expected.items():
        assert (entries[path].original, entries[path].result) == (original, became), entries[path]
    seq = fastres.convert(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()).eval())
    (entry,) = fastres.report(seq).entries
    assert (entry.original, entry.result) == ("Conv2d", "FusedConvBNAct2d")
    assert "conv+bn+relu" in entry.detail


def test_report_before_conversion_says_what_convert_would_make():
    rep = fastres.report(torchvision.models.resnet50().eval())
    entries = {e.path: e for e in rep.entries}
    assert entries["layer1.0"].detail == "fusable: convert() makes it FusedBottleneck"
    assert entries["conv1"].detail == "fusable: convert() makes it FusedStem"
    assert rep.convs_fused == 0 and rep.convs_total == 53
