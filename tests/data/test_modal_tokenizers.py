import numpy as np
import pytest

from megadiff.data.tokenizers.audio import (
    SpectralRVQ,
    log_spectral_distance,
    read_wav,
    resample,
    write_wav,
)
from megadiff.data.tokenizers.image import CodesMeta, PatchVQ, psnr
from megadiff.data.tokenizers.text import TokenizerError
from megadiff.demo.shapes import COLORS, SHAPES
from megadiff.demo.synth import Espeak, draw_shape, formant_say, shape_dataset


def test_psnr_reference_values():
    a = np.zeros((4, 4, 3), np.uint8)
    b = a.copy()
    b[0, 0, 0] = 255  # mse = 255^2 / 48 -> psnr = 10*log10(48)
    assert psnr(a, b) == pytest.approx(16.812, abs=1e-3)


def test_patch_vq_faithful_and_roundtrip(tmp_path):
    imgs, _ = shape_dataset(700, seed=1)
    vq = PatchVQ(image_size=32, patch=4, codebook_size=128).fit(imgs[:600], iters=10)
    codes = vq.encode(imgs[600:])
    assert codes.shape == (100, 8, 8) and codes.min() >= 0 and codes.max() < 128
    rec = vq.decode(codes)
    assert rec.shape == imgs[600:].shape and rec.dtype == np.uint8
    assert psnr(imgs[600:], rec) > 28.0  # flat shapes: measured ~33 dB with 256 codes
    # a blank background image is a much worse match than the reconstruction
    assert psnr(imgs[600:], np.broadcast_to(imgs[600:].mean((0, 1, 2)), rec.shape)) < 20
    vq.save(tmp_path / "img.vq")
    again = PatchVQ.load(tmp_path / "img.vq")
    assert np.array_equal(again.encode(imgs[600:]), codes)


def test_image_tokenizer_file_errors(tmp_path):
    with pytest.raises(TokenizerError, match="does not exist"):
        PatchVQ.load(tmp_path / "missing.vq")
    (tmp_path / "bad.vq").write_bytes(b"not a zip")
    with pytest.raises(TokenizerError, match="corrupt"):
        PatchVQ.load(tmp_path / "bad.vq")
    with pytest.raises(ValueError, match=r"\[N, 32, 32, 3\]"):
        PatchVQ(codebook=np.zeros((256, 48), np.float32)).encode(np.zeros((2, 16, 16, 3)))


def _speech():
    try:
        e = Espeak()
        say, sr = e.say, e.sample_rate
    except Exception:  # noqa: BLE001 - fallback synthesizer
        say, sr = formant_say, 16000
    phrases = [f"{c} {s}" for c in COLORS for s in SHAPES] * 3
    return [resample(say(p), sr, 16000) for p in phrases]


def test_spectral_rvq_faithful(tmp_path):
    wavs = _speech()
    codec = SpectralRVQ(
        sample_rate=16000, n_fft=512, hop=320, codebook_size=128, num_codebooks=2
    ).fit(wavs[:45], iters=10)
    assert codec.frame_rate == 50 and codec.tokens_per_second == 100
    x = wavs[50]
    codes = codec.encode(x)
    assert codes.shape == (1 + len(x) // 320, 2) and codes.max() < 128
    y = codec.decode(codes)
    assert abs(len(y) - len(x)) <= 320
    lsd = log_spectral_distance(x, y)
    other = log_spectral_distance(x, wavs[51])
    assert lsd < 9.0 and lsd < 0.7 * other, (lsd, other)  # measured ~6 dB vs ~12 dB
    codec.save(tmp_path / "a.codec")
    assert np.array_equal(SpectralRVQ.load(tmp_path / "a.codec").encode(x), codes)
    write_wav(tmp_path / "a.wav", y, 16000)
    z, sr = read_wav(tmp_path / "a.wav")
    assert sr == 16000 and np.allclose(z, np.clip(y, -1, 1), atol=1e-4)


def test_draw_shape_determined_by_caption():
    a = draw_shape("circle", "red", "left")
    assert tuple(a[16, 8]) == COLORS["red"] and tuple(a[16, 28]) != COLORS["red"]
    b = draw_shape("square", "blue", "right")
    assert tuple(b[16, 23]) == COLORS["blue"] and tuple(b[16, 4]) != COLORS["blue"]


def test_codes_meta(tmp_path):
    p = tmp_path / "m.json"
    p.write_text('{"codebook_size": 1024, "num_codebooks": 8, "frame_rate": 75}')
    m = CodesMeta.from_json(p)
    assert (m.codebook_size, m.num_codebooks, m.frame_rate) == (1024, 8, 75)
    p.write_text('{"num_codebooks": 8}')
    with pytest.raises(TokenizerError, match="invalid"):
        CodesMeta.from_json(p)


def test_espeak_instances_survive_each_other():
    """espeak-ng's synth callback is process-global: a second instance, created and garbage
    collected, must not leave the first one calling freed memory (this crashed the suite)."""
    import gc

    from megadiff.demo.synth import Espeak, speech_backend

    if speech_backend() != "espeak-ng":
        pytest.skip("espeak-ng is not available")
    first = Espeak()
    a = first.say("hello there")
    Espeak().say("another voice")
    gc.collect()
    b = first.say("hello there")
    assert len(a) > 1000 and abs(len(a) - len(b)) < 0.1 * len(a)
