"""The whisper-tiny audio encoder that MuseTalk conditions on.

Loading (``load_whisper_encoder``) is kept apart from the forward passes of
``WhisperAudioEncoder``:

- ``reference_hidden_states``: the stock transformers encoder on full 30 s mel windows,
  exactly what the MuseTalk reference runs.
- ``encode_batch``: the same layers called one by one, which also accepts windows
  shorter than 30 s (the positional embeddings are sliced at a per-item offset), so the
  streaming path can choose its own window. At a full window and offset 0 it equals the
  reference forward.

Both return the 5 hidden states (embeddings + 4 layers, the last after the final layer
norm) stacked as [B, T, 5, d_model] float32 numpy.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn

SAMPLE_RATE = 16000
HOP_LENGTH = 160  # mel frames at 100/s
N_FFT = 400
WINDOW_SECONDS = 30
WINDOW_SAMPLES = SAMPLE_RATE * WINDOW_SECONDS  # 480000
WINDOW_MEL_FRAMES = WINDOW_SAMPLES // HOP_LENGTH  # 3000
WINDOW_FEATURES = WINDOW_MEL_FRAMES // 2  # 1500 feature frames at 50/s

REQUIRED_FILES = ("config.json", "model.safetensors", "preprocessor_config.json")
_DOWNLOAD_HINT = "run: lipsync models download"


class WhisperAudioEncoder:
    """A loaded whisper encoder plus its feature extractor, on one device and dtype."""

    def __init__(self, encoder: nn.Module, feature_extractor, device: torch.device, dtype: torch.dtype):
        self.encoder = encoder.eval()
        self.feature_extractor = feature_extractor
        self.device = torch.device(device)
        self.dtype = dtype
        self.d_model = int(encoder.config.d_model)
        self.num_mel_bins = int(encoder.config.num_mel_bins)
        self.max_source_positions = int(encoder.config.max_source_positions)
        self.num_hidden_states = len(encoder.layers) + 1
        self._compiled = None  # device_hidden_states(compiled=True), made on first use
        if self.max_source_positions != WINDOW_FEATURES:
            raise ValueError(
                f"whisper encoder has max_source_positions={self.max_source_positions}; "
                f"MuseTalk needs the 30 s window ({WINDOW_FEATURES}): use openai/whisper-tiny"
            )

    @property
    def mel_filters(self) -> np.ndarray:
        """[n_fft/2+1, n_mels] mel filter bank of the feature extractor."""
        return np.asarray(self.feature_extractor.mel_filters)

    def log_mel(self, pcm16k: np.ndarray) -> np.ndarray:
        """Whisper's normalized log-mel of up to 30 s of audio, zero-padded: [n_mels, 3000]."""
        out = self.feature_extractor(
            np.asarray(pcm16k, dtype=np.float32), sampling_rate=SAMPLE_RATE, return_tensors="np"
        ).input_features
        return out[0]

    def reference_hidden_states(self, mel: np.ndarray | torch.Tensor) -> np.ndarray:
        """The stock transformers forward on [B, n_mels, 3000] -> [B, 1500, 5, d_model]."""
        x = torch.as_tensor(mel).to(self.device, self.dtype)
        with torch.inference_mode():
            out = self.encoder(x, output_hidden_states=True)
            stacked = torch.stack(tuple(out.hidden_states), dim=2)
        return stacked.float().cpu().numpy()

    def encode_batch(
        self, mel: np.ndarray | torch.Tensor, position_offsets: Sequence[int] | None = None,
        keep: Sequence[tuple[int, int]] | None = None,
    ) -> np.ndarray | list[np.ndarray]:
        """Hidden states of [B, n_mels, N] mel windows (N even, N <= 3000).

        Item b's first feature frame gets positional embedding ``position_offsets[b]``
        (its feature index inside the 30 s window it stands for), so a short window
        sees the same positions as in the full one. Returns [B, N/2, 5, d_model], or with
        ``keep`` (one (lo, hi) row range per item) a list of [hi - lo, 5, d_model] arrays.
        """
        x = torch.as_tensor(mel).to(self.device, self.dtype)
        if x.ndim != 3 or x.shape[1] != self.num_mel_bins:
            raise ValueError(f"mel must be [B, {self.num_mel_bins}, N], got {tuple(x.shape)}")
        n_mel = x.shape[-1]
        if n_mel % 2 or not 0 < n_mel <= WINDOW_MEL_FRAMES:
            raise ValueError(f"mel length must be even and in 2..{WINDOW_MEL_FRAMES}, got {n_mel}")
        n_feat = n_mel // 2
        offsets = torch.as_tensor(
            list(position_offsets) if position_offsets is not None else [0] * x.shape[0],
            dtype=torch.long,
            device=self.device,
        )
        if offsets.shape != (x.shape[0],):
            raise ValueError("position_offsets needs one offset per batch item")
        if int(offsets.min()) < 0 or int(offsets.max()) + n_feat > self.max_source_positions:
            raise ValueError(
                f"positions {int(offsets.min())}..{int(offsets.max()) + n_feat} exceed "
                f"the encoder's {self.max_source_positions}"
            )
        stacked = self.device_hidden_states(x, offsets)
        if keep is not None:
            # Only the rows the caller needs cross to the host (a full 30 s window of
            # five states is 11.5 MB in float32; a few frames' worth is a few kB).
            return [stacked[b, lo:hi].float().cpu().numpy() for b, (lo, hi) in enumerate(keep)]
        return stacked.float().cpu().numpy()

    def device_hidden_states(self, mel: torch.Tensor, offsets: torch.Tensor | None = None,
                             rows: torch.Tensor | None = None, out: torch.Tensor | None = None,
                             compiled: bool = False) -> torch.Tensor:
        """The 5 hidden states of mel windows, left on the device: no host copy, no sync.

        ``mel``: [B, n_mels, N] on ``self.device`` (any float dtype); N = 3000 (a full 30 s
        window) unless ``offsets`` (a [B] long tensor on the device) gives each window's
        first feature position inside the 30 s window it stands for. Returns
        [B, N/2, 5, d_model] in the encoder's dtype: ``encode_batch`` (so the reference
        forward at a full window), for callers that keep features on the GPU
        (musetalk/audio_gpu.py).

        ``rows`` ([B, Q] long, positions in 0..N/2-1) names the only positions the caller
        reads: the last layer then runs its queries and MLP on those rows alone (its keys
        and values still come from every position, so the rows' values are unchanged) and
        its state is zero elsewhere; the other four states stay whole. The last layer is a
        quarter of the encoder; a round reads tens of rows of a window's 1500.

        ``out``: a [B, N/2, 5, d_model] tensor to write the states into (a CUDA graph's
        static output); returned.

        ``compiled``: the same computation through ``torch.compile`` (Inductor fuses the
        layer norms, residual adds, GELU and the stacking that eager runs as separate passes
        over the window). Its first call per shape compiles (seconds), so callers use it
        where that happens once: ``GpuAudioStreams`` captures it into CUDA graphs at start.
        """
        if offsets is None and (mel.ndim != 3 or tuple(mel.shape[1:]) != (self.num_mel_bins, WINDOW_MEL_FRAMES)):
            raise ValueError(f"mel must be [B, {self.num_mel_bins}, {WINDOW_MEL_FRAMES}], got {tuple(mel.shape)}")
        if mel.ndim != 3 or mel.shape[1] != self.num_mel_bins or mel.shape[2] % 2:
            raise ValueError(f"mel must be [B, {self.num_mel_bins}, even N], got {tuple(mel.shape)}")
        with torch.inference_mode():
            if not compiled:
                return torch.stack(self._states(mel, offsets, rows), dim=2, out=out)
            if self._compiled is None:
                self._compiled = torch.compile(self._stacked)
            return self._compiled(mel, offsets, rows, out)

    def _stacked(self, mel: torch.Tensor, offsets: torch.Tensor | None, rows: torch.Tensor | None,
                 out: torch.Tensor | None) -> torch.Tensor:
        """The states stacked, written into ``out`` where given: the compiled form (in the
        graph the copy into ``out`` is the stacking's own write)."""
        stacked = torch.stack(self._states(mel, offsets, rows), dim=2)
        return stacked if out is None else out.copy_(stacked)

    def _states(self, mel: torch.Tensor, offsets: torch.Tensor | None,
                rows: torch.Tensor | None) -> list[torch.Tensor]:
        """The five hidden states, [B, N/2, d_model] each (see device_hidden_states)."""
        enc = self.encoder
        h = nn.functional.gelu(enc.conv1(mel.to(self.dtype)))
        h = nn.functional.gelu(enc.conv2(h)).permute(0, 2, 1)
        if offsets is None:
            h = h + enc.embed_positions.weight[: h.shape[1]]
        else:
            positions = offsets[:, None] + torch.arange(h.shape[1], device=h.device)[None, :]
            h = h + enc.embed_positions(positions)
        states = [h]
        layers = list(enc.layers)
        for layer in layers[:-1]:
            h = _layer_at_rows(layer, h, None)
            states.append(h)
        last = enc.layer_norm(_layer_at_rows(layers[-1], h, rows))
        if rows is not None:
            last = h.new_zeros(h.shape).scatter_(1, rows[:, :, None].expand(-1, -1, h.shape[2]), last)
        states.append(last)
        return states


def _layer_at_rows(layer: nn.Module, h: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """A whisper encoder layer's output at ``rows`` ([B, Q]) of its input ``h`` ([B, N, D]),
    or at every position (``rows`` None): what ``layer(h, None)`` of transformers gives
    (pre-norm self-attention over all N positions, then the MLP), with queries, attention
    outputs and the MLP computed for the Q rows only."""
    attn = layer.self_attn
    b, n, d = h.shape
    heads = attn.num_heads
    x = layer.self_attn_layer_norm(h)
    if rows is None:
        h_rows, x_rows = h, x
    else:
        picked = rows[:, :, None].expand(-1, -1, d)
        h_rows, x_rows = torch.gather(h, 1, picked), torch.gather(x, 1, picked)
    q = (attn.q_proj(x_rows) * attn.scaling).view(b, -1, heads, d // heads).transpose(1, 2)
    k = attn.k_proj(x).view(b, n, heads, d // heads).transpose(1, 2)
    v = attn.v_proj(x).view(b, n, heads, d // heads).transpose(1, 2)
    a = nn.functional.scaled_dot_product_attention(q, k, v, scale=1.0)
    y = h_rows + attn.out_proj(a.transpose(1, 2).reshape(b, -1, d))
    y = y + layer.fc2(layer.activation_fn(layer.fc1(layer.final_layer_norm(y))))
    if y.dtype == torch.float16:
        clamp = torch.finfo(y.dtype).max - 1000
        y = torch.clamp(y, min=-clamp, max=clamp)
    return y


def _check_files(model_dir: Path) -> None:
    if not model_dir.is_dir():
        raise FileNotFoundError(f"whisper model folder {model_dir} does not exist; {_DOWNLOAD_HINT}")
    for name in REQUIRED_FILES:
        path = model_dir / name
        if not path.is_file():
            raise FileNotFoundError(f"whisper model file {path} is missing; {_DOWNLOAD_HINT}")
    for name in ("config.json", "preprocessor_config.json"):
        path = model_dir / name
        try:
            json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError) as exc:
            raise ValueError(f"whisper model file {path} is not valid JSON ({exc}); {_DOWNLOAD_HINT}") from exc


def load_whisper_encoder(
    model_dir: Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> WhisperAudioEncoder:
    """Load the encoder and feature extractor from a folder in the openai/whisper-tiny format."""
    from transformers import WhisperFeatureExtractor, WhisperModel

    model_dir = Path(model_dir)
    _check_files(model_dir)
    try:
        feature_extractor = WhisperFeatureExtractor.from_pretrained(model_dir)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise ValueError(
            f"cannot read {model_dir / 'preprocessor_config.json'} ({exc}); {_DOWNLOAD_HINT}"
        ) from exc
    try:
        model = WhisperModel.from_pretrained(model_dir, dtype=torch.float32)
    except Exception as exc:  # safetensors/transformers raise many types for a broken file
        raise ValueError(
            f"cannot load whisper weights {model_dir / 'model.safetensors'} ({type(exc).__name__}: {exc}); "
            f"{_DOWNLOAD_HINT}"
        ) from exc
    encoder = model.encoder
    del model  # the decoder is never used
    encoder.to(device=device, dtype=dtype)
    return WhisperAudioEncoder(encoder, feature_extractor, torch.device(device), dtype)


def whisper_config(size: Literal["full", "tiny"] = "tiny"):
    """The openai/whisper-tiny config ("full") or a CPU-test variant ("tiny").

    "tiny" keeps what the audio features' shapes depend on (d_model 384, 4 encoder
    layers -> 5 hidden states, 80 mel bins, 1500 positions) and shrinks the rest.
    """
    from transformers import WhisperConfig

    common = dict(
        d_model=384,
        encoder_layers=4,
        num_mel_bins=80,
        max_source_positions=WINDOW_FEATURES,
    )
    if size == "full":
        return WhisperConfig(
            **common,
            vocab_size=51865,
            encoder_attention_heads=6,
            encoder_ffn_dim=1536,
            decoder_layers=4,
            decoder_attention_heads=6,
            decoder_ffn_dim=1536,
            max_target_positions=448,
        )
    if size == "tiny":
        return WhisperConfig(
            **common,
            vocab_size=64,
            encoder_attention_heads=2,
            encoder_ffn_dim=64,
            decoder_layers=1,
            decoder_attention_heads=2,
            decoder_ffn_dim=64,
            max_target_positions=32,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            decoder_start_token_id=1,
        )
    raise ValueError(f"size must be 'full' or 'tiny', got {size!r}")


def write_random_whisper(model_dir: Path, size: Literal["full", "tiny"] = "tiny", seed: int = 0) -> Path:
    """Write a random-weight whisper model in the hub folder format (for tests and benchmarks)."""
    from transformers import WhisperFeatureExtractor, WhisperForConditionalGeneration

    config = whisper_config(size)
    torch.manual_seed(seed)
    model = WhisperForConditionalGeneration(config).eval()
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(model_dir, safe_serialization=True)
    WhisperFeatureExtractor(feature_size=config.num_mel_bins).save_pretrained(model_dir)
    return model_dir
