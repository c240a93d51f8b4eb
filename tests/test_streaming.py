"""Audio front end: torchaudio parity, streaming == offline, resampling, input errors."""

import pytest
import torch
import torchaudio

from autoglm_phone.config import AudioConfig
from autoglm_phone.models.towers import AudioTower, LogMel, StreamingResample, resample

# A 16 kHz model (25 ms / 10 ms frames) and an 8 kHz one with the same frame durations.
CONFIGS = {
    16000: AudioConfig(),
    8000: AudioConfig(sample_rate=8000, n_fft=200, hop_length=80),
}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: one intra-op thread is faster than several, much more so on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _stream(frontend, wave: torch.Tensor, sizes, **kwargs) -> torch.Tensor:
    """Push ``wave`` in chunks of the given sizes (cycled), then flush; concatenate all frames."""
    stream, outs, start, i = frontend.stream(**kwargs), [], 0, 0
    while start < wave.shape[1]:
        size = sizes[i % len(sizes)]
        outs.append(stream.push(wave[:, start : start + size]))
        start, i = start + size, i + 1
    outs.append(stream.flush())
    assert all(o.shape[:2] == (wave.shape[0], frontend.n_mels) for o in outs)
    return torch.cat(outs, dim=-1)


def _tone(rate: int, seconds: float = 0.5, hz: float = 440.0) -> torch.Tensor:
    t = torch.arange(int(rate * seconds)) / rate
    return 0.5 * torch.sin(2 * torch.pi * hz * t)[None]  # (1, n)


@pytest.mark.parametrize("rate", sorted(CONFIGS))
def test_logmel_matches_torchaudio_melspectrogram(rate):
    frontend = LogMel(CONFIGS[rate])
    wave = 0.1 * torch.randn(2, 2001)
    reference = torch.log(frontend.mel(wave) + 1e-6)  # torchaudio: center=True, reflect
    assert frontend(wave).shape == reference.shape
    assert torch.allclose(frontend(wave), reference, atol=1e-5)


@pytest.mark.parametrize("rate", sorted(CONFIGS))
@pytest.mark.parametrize("sizes", [[1], [7], [160], [401], [1000], [5000], [3, 250, 1, 999]])
def test_streaming_equals_offline(rate, sizes):
    frontend = LogMel(CONFIGS[rate])
    torch.manual_seed(0)
    n = 601 if sizes == [1] else 2001  # odd lengths: the last frame is partial
    wave = 0.1 * torch.randn(2, n)
    offline = frontend(wave)
    streamed = _stream(frontend, wave, sizes)
    assert streamed.shape == offline.shape
    assert torch.allclose(streamed, offline, atol=1e-5)


def test_streaming_emits_frames_as_soon_as_they_are_complete():
    stream = LogMel(CONFIGS[16000]).stream()  # n_fft 400 (pad 200), hop 160
    assert stream.push(torch.randn(1, 200)).shape[-1] == 0  # left reflection needs x[1..200]
    assert stream.push(torch.randn(1, 1)).shape[-1] == 1  # frame 0 covers x[-200, 200)
    assert stream.push(torch.randn(1, 158)).shape[-1] == 0
    assert stream.push(torch.randn(1, 1)).shape[-1] == 1  # frame 1 covers x[-40, 360)
    assert stream.flush().shape[-1] == 1  # 1 + 360 // 160 = 3 frames in all
    assert stream.push(torch.randn(3, 500)).shape[-1] == 2  # reset: a new batch size is fine


@pytest.mark.parametrize("model_rate, input_rate", [(16000, 8000), (16000, 44100), (8000, 22050)])
def test_streaming_resamples_with_state(model_rate, input_rate):
    frontend = LogMel(CONFIGS[model_rate])
    wave = 0.1 * torch.randn(2, 1999)
    for sizes in ([1], [13], [640, 7]):
        streamed = _stream(frontend, wave, sizes, sample_rate=input_rate)
        assert torch.allclose(streamed, frontend(wave, input_rate), atol=1e-5)
    resampler = StreamingResample(input_rate, model_rate)
    chunks = [resampler.push(c) for c in wave.split(37, dim=1)] + [resampler.flush()]
    offline = resample(wave, input_rate, model_rate)
    assert torch.allclose(torch.cat(chunks, dim=1), offline, atol=1e-6)
    # torchaudio's kernel and arithmetic in float64; its float32 forms are ~1e-6 off that
    reference = torchaudio.transforms.Resample(input_rate, model_rate, dtype=torch.float64)
    assert torch.allclose(offline.double(), reference(wave.double()), atol=1e-7)
    fp32 = torchaudio.functional.resample(wave, input_rate, model_rate)
    assert torch.allclose(offline, fp32, atol=1e-5)


@pytest.mark.parametrize("rate", sorted(CONFIGS))
def test_tone_at_8k_and_16k_gives_the_same_logmel(rate):
    frontend = LogMel(CONFIGS[rate])
    a, b = frontend(_tone(16000), 16000), frontend(_tone(8000), 8000)
    assert a.shape == b.shape
    # compare within 8 nats (~35 dB) of the peak, away from the edges where the resampler's
    # zero padding rings: below that lie only the window's and the filter's leakage floors
    floor = a.amax() - 8.0
    a, b = a.clamp(min=floor)[..., 2:-2], b.clamp(min=floor)[..., 2:-2]
    assert (a - b).abs().max() < 1e-2


def test_tower_on_streamed_mel_equals_offline():
    tower = AudioTower(AudioConfig(depth=1)).eval()
    wave = 0.1 * torch.randn(2, 4000)
    with torch.no_grad():
        streamed = tower.forward_mel(_stream(tower.frontend, wave, [333]))
        assert torch.allclose(streamed, tower.forward_features(wave), atol=1e-5)


def test_bad_audio_gets_a_clear_error():
    frontend = LogMel(CONFIGS[16000])
    with pytest.raises(ValueError, match="mono"):
        frontend(torch.randn(1, 2, 1000))  # (batch, channels, samples)
    with pytest.raises(ValueError, match="mono"):
        frontend(torch.randn(1000))
    with pytest.raises(TypeError, match="floating-point"):
        frontend(torch.zeros(1, 1000, dtype=torch.int16))
    with pytest.raises(ValueError, match="empty"):
        frontend(torch.zeros(1, 0))
    with pytest.raises(ValueError, match="too short"):
        frontend(torch.zeros(1, 200))
    with pytest.raises(ValueError, match="sample_rate"):
        frontend(torch.zeros(1, 1000), sample_rate=0)
    stream = frontend.stream()
    with pytest.raises(ValueError, match="mono"):
        stream.push(torch.randn(1, 2, 100))
    with pytest.raises(TypeError, match="floating-point"):
        stream.push(torch.zeros(1, 100, dtype=torch.int32))
    with pytest.raises(ValueError, match="empty"):
        stream.push(torch.zeros(1, 0))
    with pytest.raises(ValueError, match="before any push"):
        stream.flush()
    stream.push(torch.randn(2, 100))
    with pytest.raises(ValueError, match="batch size changed"):
        stream.push(torch.randn(1, 100))
    with pytest.raises(ValueError, match="too short"):
        stream.flush()


def _logmel_float64(frontend: LogMel, wave: torch.Tensor) -> torch.Tensor:
    """The log-mel computed in float64 (rfft of centred, windowed frames): the exact value."""
    pad = frontend.pad
    padded = torch.nn.functional.pad(wave.double()[:, None], (pad, pad), mode="reflect")[:, 0]
    frames = padded.unfold(-1, frontend.n_fft, frontend.hop_length)
    power = torch.fft.rfft(frames * frontend.mel.spectrogram.window.double()).abs().pow(2)
    return torch.log(power @ frontend.mel.mel_scale.fb.double() + 1e-6).transpose(1, 2)


@pytest.mark.parametrize("rate", sorted(CONFIGS))
def test_dft_logmel_equals_logmel(rate):
    """The export front end (frames times the windowed DFT basis, no complex numbers) against the
    eager rfft one: close on noise, and on a pure tone (bands near the 1e-6 floor, where float32
    rounding shows in the log) as close to the float64 value as rfft is."""
    frontend = LogMel(CONFIGS[rate])
    noise = 0.1 * torch.randn(2, 2001, generator=torch.Generator().manual_seed(0))
    assert frontend.dft_logmel(noise).shape == frontend(noise).shape
    assert torch.allclose(frontend.dft_logmel(noise), frontend(noise), atol=1e-4)
    for wave in (noise, _tone(rate)):
        exact = _logmel_float64(frontend, wave)
        conv_err = (frontend.dft_logmel(wave) - exact).abs().max()
        rfft_err = (frontend(wave) - exact).abs().max()
        assert conv_err <= 2 * rfft_err + 1e-5


def test_audio_tower_runs_in_half_precision():
    """The sinusoidal position table follows the input's dtype (it stayed float32 and made the
    blocks see mixed dtypes); float32 results are unchanged."""
    tower = AudioTower(AudioConfig(depth=1)).eval()
    mel = torch.randn(1, 64, 40)
    ref = tower.forward_mel(mel)
    out = tower.to(torch.bfloat16).forward_mel(mel.bfloat16())
    assert out.dtype == torch.bfloat16
    assert torch.allclose(out.float(), ref, atol=0.1)
