"""Real speech audio and Silero VAD (16 kHz) as a plain, quantizable ``nn.Module``.

``data/speech_16k.wav`` is about 12 s of English speech (4 sentences, 0.6 s pauses), made with
Debian's espeak-ng and sox::

    espeak-ng -v en-us -s 175 -w sN.wav "<sentence N>"
    sox sN.wav -r 16000 -c 1 -b 16 rN.wav silence 1 0.01 0.5% reverse silence 1 0.01 0.5% reverse
    sox edge.wav r1.wav gap.wav r2.wav gap.wav r3.wav gap.wav r4.wav edge.wav speech_16k.wav

(``gap.wav``/``edge.wav``: 0.6 s / 0.3 s of silence from ``sox -n ... trim 0 T``.)

The ``silero-vad`` pip package ships its model as TorchScript (``silero_vad/data/silero_vad.jit``,
a ``VADRNNJITMerge`` holding a 16 kHz and an 8 kHz ``VADRNNJIT``). :class:`SileroVAD` re-implements
the 16 kHz branch with ordinary modules and loads the TorchScript weights into it. We read the
file directly rather than importing ``silero_vad``, whose import calls ``torch.set_num_threads(1)``.
"""

from __future__ import annotations

import importlib.util
import warnings
import wave
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

SPEECH_PATH = Path(__file__).parent / "data" / "speech_16k.wav"
SAMPLE_RATE = 16000
CHUNK = 512  # samples per VAD step at 16 kHz
CONTEXT = 64  # samples carried over from the previous chunk


def load_speech() -> torch.Tensor:
    """The committed speech clip as a float32 mono tensor ``[samples]`` in [-1, 1) at 16 kHz."""
    with wave.open(str(SPEECH_PATH), "rb") as wf:
        if wf.getnchannels() != 1 or wf.getsampwidth() != 2 or wf.getframerate() != SAMPLE_RATE:
            raise ValueError(f"{SPEECH_PATH} must be 16-bit mono {SAMPLE_RATE} Hz PCM")
        raw = wf.readframes(wf.getnframes())
    return torch.frombuffer(bytearray(raw), dtype=torch.int16).to(torch.float32) / 32768.0


class SileroVAD(nn.Module):
    """Silero VAD v5/v6 16 kHz network: STFT conv -> 4 Conv1d+ReLU -> nn.LSTMCell -> Conv1d -> sigmoid.

    ``forward(x, state)`` takes ``x`` ``[B, 64 + 512]`` (context + chunk) and ``state``
    ``[2, B, 128]`` (h, c) and returns ``(speech probability [B, 1], new state)``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.n_fft, self.hop, self.pad = 256, 128, 64
        self.stft = nn.Conv1d(1, self.n_fft + 2, self.n_fft, stride=self.hop, bias=False)  # fixed basis
        self.conv1 = nn.Conv1d(self.n_fft // 2 + 1, 128, 3, padding=1)
        self.conv2 = nn.Conv1d(128, 64, 3, stride=2, padding=1)
        self.conv3 = nn.Conv1d(64, 64, 3, stride=2, padding=1)
        self.conv4 = nn.Conv1d(64, 128, 3, padding=1)
        self.relu = nn.ReLU()
        self.rnn = nn.LSTMCell(128, 128)
        self.head = nn.Conv1d(128, 1, 1)

    def initial_state(self, batch_size: int = 1) -> torch.Tensor:
        """Zero (h, c) state ``[2, B, 128]``."""
        return torch.zeros(2, batch_size, 128)

    def forward(
        self, x: torch.Tensor, state: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if state is None:
            state = self.initial_state(x.shape[0]).to(x)
        x = F.pad(x.unsqueeze(1), (0, self.pad), mode="reflect")
        spec = self.stft(x)
        cutoff = self.n_fft // 2 + 1
        mag = torch.sqrt(spec[:, :cutoff] ** 2 + spec[:, cutoff:] ** 2)
        y = self.relu(self.conv1(mag))
        y = self.relu(self.conv2(y))
        y = self.relu(self.conv3(y))
        y = self.relu(self.conv4(y))  # [B, 128, 1]
        h, c = self.rnn(y.squeeze(-1), (state[0], state[1]))
        out = torch.sigmoid(self.head(self.relu(h.unsqueeze(-1))))  # [B, 1, 1]
        return out.mean(dim=2), torch.stack([h, c])


def silero_jit_path() -> Path:
    """Path of ``silero_vad.jit`` inside the installed ``silero-vad`` package."""
    spec = importlib.util.find_spec("silero_vad")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("Silero VAD weights need the package: pip install silero-vad --no-deps")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "silero_vad.jit"
    if not path.exists():
        raise FileNotFoundError(path)
    return path


def load_silero_vad_jit() -> torch.jit.ScriptModule:
    """The shipped TorchScript model (stateful: ``model(chunk [B,512], 16000) -> prob [B,1]``)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.load is deprecated in 2.13
        return torch.jit.load(str(silero_jit_path()), map_location="cpu").eval()


_JIT_TO_PLAIN = {
    "stft.forward_basis_buffer": "stft.weight",
    "encoder.0.reparam_conv.": "conv1.",
    "encoder.1.reparam_conv.": "conv2.",
    "encoder.2.reparam_conv.": "conv3.",
    "encoder.3.reparam_conv.": "conv4.",
    "decoder.rnn.": "rnn.",
    "decoder.decoder.2.": "head.",
}


def load_silero_vad() -> SileroVAD:
    """:class:`SileroVAD` in eval mode with the 16 kHz weights of the shipped TorchScript model."""
    jit_state = load_silero_vad_jit().state_dict()
    state = {}
    for key, value in jit_state.items():
        if not key.startswith("_model."):
            continue  # "_model_8k." is the 8 kHz branch
        key = key[len("_model.") :]
        for old, new in _JIT_TO_PLAIN.items():
            key = key.replace(old, new)
        state[key] = value.detach().clone().float()
    model = SileroVAD()
    model.load_state_dict(state, strict=True)
    return model.eval()


@torch.no_grad()
def speech_probs(model: nn.Module, wav: torch.Tensor) -> torch.Tensor:
    """Stream ``wav`` ``[samples]`` through a :class:`SileroVAD` in 512-sample chunks -> ``[n_chunks]``.

    Mirrors the shipped model's stateful wrapper: zero-pad the tail to a whole chunk, prepend the
    last 64 samples of the previous chunk (zeros at the start), carry the LSTM state.
    """
    wav = wav.reshape(1, -1).float()
    if wav.shape[1] % CHUNK:
        wav = F.pad(wav, (0, CHUNK - wav.shape[1] % CHUNK))
    wav = F.pad(wav, (CONTEXT, 0))
    state = None
    probs = []
    for start in range(CONTEXT, wav.shape[1], CHUNK):
        prob, state = model(wav[:, start - CONTEXT : start + CHUNK], state)
        probs.append(prob[:, 0])
    return torch.cat(probs)


@torch.no_grad()
def speech_probs_jit(jit_model: torch.jit.ScriptModule, wav: torch.Tensor) -> torch.Tensor:
    """Same as :func:`speech_probs` but with the shipped TorchScript model (reference output)."""
    jit_model.reset_states()
    wav = wav.reshape(1, -1).float()
    if wav.shape[1] % CHUNK:
        wav = F.pad(wav, (0, CHUNK - wav.shape[1] % CHUNK))
    probs = [jit_model(wav[:, i : i + CHUNK], SAMPLE_RATE)[:, 0] for i in range(0, wav.shape[1], CHUNK)]
    jit_model.reset_states()
    return torch.cat(probs)
