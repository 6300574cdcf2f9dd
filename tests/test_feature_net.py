"""FeatureNet2D: shapes at any size, normalisation, weight loading (names, RGB->grey fold, errors)."""
import numpy as np
import pytest
import torch

from tempeh.errors import TempehDataError
from tempeh.models.feature_net import FeatureNet2D

TINY = dict(blocks=(1, 1, 1, 1), widths=(8, 8, 16, 16), stem_width=8)



@pytest.mark.parametrize("size,upsample", [((37, 51), "bilinear"), ((32, 64), "nearest"),
                                           ((9, 13), "bilinear")])
def test_output_at_input_resolution(size, upsample):
    torch.manual_seed(0)
    net = FeatureNet2D(1, 5, upsample=upsample, **TINY)
    x = torch.rand(2, 1, *size)
    y = net(x)
    assert y.shape == (2, 5, *size)
    y.square().mean().backward()
    assert all(p.grad is not None for p in net.parameters())


def test_input_normalisation_and_channel_check():
    torch.manual_seed(0)
    net = FeatureNet2D(1, 4, **TINY).eval()
    # grey input is normalised with the averages of the ImageNet statistics (documented)
    assert abs(float(net.mean) - np.mean([0.485, 0.456, 0.406])) < 1e-7
    assert abs(float(net.std) - np.mean([0.229, 0.224, 0.225])) < 1e-7
    with pytest.raises(ValueError, match="expects"):
        net(torch.rand(1, 3, 16, 16))


def _torchvision_style_state(seed, blocks, widths, stem, in_ch=3):
    """A state dict with torchvision ResNet names built from an independent RGB net + fc keys."""
    torch.manual_seed(seed)
    donor = FeatureNet2D(in_ch, 4, blocks=blocks, widths=widths, stem_width=stem)
    sd = {k: v.clone() for k, v in donor.encoder.state_dict().items()}
    sd["fc.weight"] = torch.randn(10, widths[-1])
    sd["fc.bias"] = torch.randn(10)
    return sd


def test_load_encoder_weights_maps_names_and_folds_rgb_stem(tmp_path):
    sd = _torchvision_style_state(1, (1, 1, 1, 1), (8, 8, 16, 16), 8)
    path = tmp_path / "resnet.pth"
    torch.save({"state_dict": {"module." + k: v for k, v in sd.items()}}, path)
    torch.manual_seed(2)
    net = FeatureNet2D(1, 4, **TINY)
    loaded = net.load_encoder_weights(path)
    assert "layer2.0.downsample.0.weight" in loaded
    enc = net.encoder.state_dict()
    for k, v in sd.items():
        if k.startswith("fc.") or k == "conv1.weight":
            continue
        assert torch.equal(enc[k], v), k
    # grey stem = sum_c W_c * std_grey / std_c (computed independently in numpy)
    std = np.array([0.229, 0.224, 0.225])
    ref = (sd["conv1.weight"].numpy() * (std.mean() / std)[None, :, None, None]).sum(1, keepdims=True)
    np.testing.assert_allclose(enc["conv1.weight"].numpy(), ref, rtol=1e-6, atol=1e-7)
    # a grey image through the folded grey net == the RGB net on the replicated grey image,
    # once the RGB net's per-channel means are replaced by the grey mean (the documented fold)
    torch.manual_seed(1)
    rgb = FeatureNet2D(3, 4, **TINY).eval()
    rgb.encoder.load_state_dict({k: v for k, v in sd.items() if not k.startswith("fc.")})
    rgb.mean.fill_(float(net.mean))
    net.eval()
    x = torch.rand(1, 1, 20, 24)
    a = net.encoder(((x - net.mean) / net.std))[-1]
    b = rgb.encoder(((x.expand(1, 3, 20, 24) - rgb.mean) / rgb.std))[-1]
    np.testing.assert_allclose(a.detach().numpy(), b.detach().numpy(), rtol=1e-4, atol=1e-5)


def test_load_encoder_weights_errors(tmp_path):
    sd = _torchvision_style_state(1, (1, 1, 1, 1), (8, 8, 16, 16), 8)
    del sd["layer3.0.conv2.weight"]
    path = tmp_path / "partial.pth"
    torch.save(sd, path)
    net = FeatureNet2D(1, 4, **TINY)
    with pytest.raises(TempehDataError, match="partial.pth.*missing.*layer3.0.conv2.weight"):
        net.load_encoder_weights(path)
    wrong = _torchvision_style_state(1, (1, 1, 1, 1), (8, 8, 16, 32), 8)
    torch.save(wrong, tmp_path / "wrong.pth")
    with pytest.raises(TempehDataError, match="wrong.pth.*shape"):
        net.load_encoder_weights(tmp_path / "wrong.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(TempehDataError, match="junk.pth"):
        net.load_encoder_weights(tmp_path / "junk.pth")
