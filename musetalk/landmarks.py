"""68-point face landmarks (iBUG layout) for avatar preparation.

Two implementations behind one small protocol:

* :class:`OnnxLandmarker`: the DWPose whole-body model (``dw-ll_ucoco_384.onnx``, hub
  repository ``yzd-v/DWPose``) on onnxruntime. It is the network the reference runs
  through mmpose; here it runs without mmcv/mmpose. Face keypoints 23..90 of the 133
  COCO-WholeBody points are the 68 iBUG points.
* :class:`HaarTemplateLandmarker`: no download at all. OpenCV's bundled Haar face
  detector plus a fixed mean face fitted to the detection box. The mouth and chin
  positions are guesses from face proportions, so crops are less tight and do not
  follow the jaw: usable for development, visibly worse for production avatars.

Both find faces with the Haar cascade (the reference uses S3FD, whose weights come
from research-only data). Several faces: ``multi_face="largest"`` keeps the largest and
warns once, ``"error"`` raises.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Protocol, runtime_checkable

import cv2
import numpy as np

log = logging.getLogger(__name__)

DWPOSE_INPUT_HW = (384, 288)
DWPOSE_KEYPOINTS = 133
DWPOSE_SPLIT_RATIO = 2.0
FACE_KPT_SLICE = slice(23, 91)
# mmpose's data preprocessor for the wholebody RTMPose configs (RGB order).
PIXEL_MEAN = np.array([123.675, 116.28, 103.53], dtype=np.float32)
PIXEL_STD = np.array([58.395, 57.12, 57.375], dtype=np.float32)
HAAR_FILE = "haarcascade_frontalface_default.xml"


@runtime_checkable
class Landmarker(Protocol):
    """Finds one face and returns its 68 iBUG points in frame pixels, or None."""

    quality: str

    def detect(self, frame_rgb: np.ndarray) -> np.ndarray | None: ...


class MultipleFacesError(ValueError):
    pass


class HaarFaceDetector:
    """OpenCV's bundled frontal-face cascade; boxes as (x1, y1, x2, y2)."""

    def __init__(self, multi_face: str = "largest", min_size_fraction: float = 0.08) -> None:
        if multi_face not in ("largest", "error"):
            raise ValueError(f"multi_face must be 'largest' or 'error', got {multi_face!r}")
        if not hasattr(cv2, "CascadeClassifier"):
            raise RuntimeError(
                f"this OpenCV ({cv2.__version__}) has no CascadeClassifier: OpenCV 5 moved "
                "the Haar cascades out; install opencv-python-headless<5"
            )
        path = str(Path(cv2.data.haarcascades) / HAAR_FILE)
        self._cascade = cv2.CascadeClassifier(path)
        if self._cascade.empty():
            raise RuntimeError(f"could not load OpenCV's Haar cascade {path}")
        self.multi_face = multi_face
        self.min_size_fraction = min_size_fraction
        self._warned_multi = False

    def detect(self, frame_rgb: np.ndarray) -> tuple[int, int, int, int] | None:
        gray = cv2.cvtColor(np.ascontiguousarray(frame_rgb), cv2.COLOR_RGB2GRAY)
        min_side = max(24, int(min(gray.shape) * self.min_size_fraction))
        # minNeighbors 6: fewer false faces on clothes and backgrounds than the default 3.
        found = self._cascade.detectMultiScale(gray, scaleFactor=1.1, minNeighbors=6, minSize=(min_side, min_side))
        if len(found) == 0:
            return None
        if len(found) > 1:
            if self.multi_face == "error":
                raise MultipleFacesError(
                    f"{len(found)} faces in one frame; the idle video must show one person "
                    "(or set multi_face='largest' to keep the largest face)"
                )
            if not self._warned_multi:
                log.warning("several faces in a frame (%d); keeping the largest", len(found))
                self._warned_multi = True
        x, y, w, h = max(found, key=lambda r: int(r[2]) * int(r[3]))
        return int(x), int(y), int(x + w), int(y + h)


# Mean iBUG-68 face in a Haar frontal-face box (0..1 in x and y, y grows downwards).
# Tuned by eye on frontal faces; the chin lies slightly below the Haar box.
def _template() -> np.ndarray:
    pts = np.zeros((68, 2), dtype=np.float64)
    theta = np.pi - np.arange(17) * np.pi / 16
    pts[0:17, 0] = 0.5 + 0.44 * np.cos(theta)
    pts[0:17, 1] = 0.38 + 0.75 * np.sin(theta)
    brow_x = np.linspace(0.16, 0.44, 5)
    brow_y = np.array([0.27, 0.235, 0.225, 0.23, 0.245])
    pts[17:22] = np.stack([brow_x, brow_y], 1)
    pts[22:27] = np.stack([1.0 - brow_x[::-1], brow_y[::-1]], 1)
    pts[27:31] = [[0.5, 0.36], [0.5, 0.45], [0.5, 0.54], [0.5, 0.63]]
    pts[31:36] = [[0.41, 0.68], [0.45, 0.695], [0.5, 0.705], [0.55, 0.695], [0.59, 0.68]]
    left_eye = [[0.22, 0.385], [0.265, 0.36], [0.32, 0.36], [0.365, 0.39], [0.32, 0.40], [0.265, 0.40]]
    pts[36:42] = left_eye
    # Right eye: mirrored, iBUG order starts at the inner corner.
    right = [[1.0 - x, y] for x, y in left_eye]
    pts[42:48] = [right[3], right[2], right[1], right[0], right[5], right[4]]
    pts[48:60] = [
        [0.35, 0.80], [0.40, 0.78], [0.46, 0.77], [0.5, 0.775], [0.54, 0.77], [0.60, 0.78],
        [0.65, 0.80], [0.60, 0.835], [0.54, 0.85], [0.5, 0.855], [0.46, 0.85], [0.40, 0.835],
    ]
    pts[60:68] = [
        [0.37, 0.80], [0.46, 0.795], [0.5, 0.797], [0.54, 0.795],
        [0.63, 0.80], [0.54, 0.81], [0.5, 0.813], [0.46, 0.81],
    ]
    return pts


MEAN_FACE_IN_HAAR_BOX = _template()


def _clip_points(points: np.ndarray, frame_w: int, frame_h: int) -> np.ndarray:
    out = points.astype(np.float64).copy()
    out[:, 0] = np.clip(out[:, 0], 0, frame_w - 1)
    out[:, 1] = np.clip(out[:, 1], 0, frame_h - 1)
    return out


class HaarTemplateLandmarker:
    """No-download fallback: Haar face box + the mean face. Lower quality (see module doc)."""

    quality = "opencv-fallback (lower quality)"
    _warned = False

    def __init__(self, multi_face: str = "largest") -> None:
        # Built on first use: an avatar that ships precomputed landmarks never needs it
        # (and some OpenCV builds lack the cascade).
        self._multi_face = multi_face
        self._detector: HaarFaceDetector | None = None
        if not HaarTemplateLandmarker._warned:
            log.warning(
                "face landmarks from OpenCV's Haar detector and a mean face template: lower "
                "quality; install the DWPose model (lipsync models download) for real landmarks"
            )
            HaarTemplateLandmarker._warned = True

    def detect(self, frame_rgb: np.ndarray) -> np.ndarray | None:
        if self._detector is None:
            self._detector = HaarFaceDetector(multi_face=self._multi_face)
        box = self._detector.detect(frame_rgb)
        if box is None:
            return None
        x1, y1, x2, y2 = box
        pts = MEAN_FACE_IN_HAAR_BOX * [x2 - x1, y2 - y1] + [x1, y1]
        return _clip_points(pts, frame_rgb.shape[1], frame_rgb.shape[0])


def _person_box_from_face(face: tuple[int, int, int, int], aspect_wh: float) -> tuple[np.ndarray, np.ndarray]:
    """Centre and (w, h) of a head-and-shoulders box around a face box.

    The whole-body model was trained on person boxes; a head-and-shoulders box keeps the
    face large in the 288x384 input while giving the model the context it expects.
    """
    x1, y1, x2, y2 = face
    fw, fh = x2 - x1, y2 - y1
    centre = np.array([(x1 + x2) / 2.0, y1 + fh * 0.9], dtype=np.float64)
    w = fw * 2.2
    h = max(fh * 2.6, w / aspect_wh)
    w = max(w, h * aspect_wh)
    return centre, np.array([w, h], dtype=np.float64)


def _affine_to_input(centre: np.ndarray, scale_wh: np.ndarray, out_wh: tuple[int, int]) -> np.ndarray:
    """2x3 matrix mapping the box (centre, scale) onto the model input (no rotation)."""
    out_w, out_h = out_wh
    sx = out_w / scale_wh[0]
    sy = out_h / scale_wh[1]
    return np.array(
        [[sx, 0.0, out_w / 2.0 - sx * centre[0]], [0.0, sy, out_h / 2.0 - sy * centre[1]]],
        dtype=np.float64,
    )


class OnnxLandmarker:
    """DWPose (RTMPose-l whole-body, 384x288) on onnxruntime, face points only."""

    quality = "dwpose-onnx"

    def __init__(
        self,
        model_dir: str | Path,
        *,
        multi_face: str = "largest",
        providers: list[str] | None = None,
        intra_op_threads: int = 0,
    ) -> None:
        import onnxruntime as ort

        path = find_dwpose(model_dir)
        opts = ort.SessionOptions()
        if intra_op_threads:
            opts.intra_op_num_threads = intra_op_threads
        avail = ort.get_available_providers()
        providers = providers or [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in avail]
        self._session = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
        inp = self._session.get_inputs()[0]
        self._input_name = inp.name
        shape = inp.shape
        if len(shape) != 4 or shape[1] != 3:
            raise ValueError(f"{path}: expected an NCHW RGB input, got shape {shape}")
        h, w = (int(s) if isinstance(s, int) else d for s, d in zip(shape[2:], DWPOSE_INPUT_HW))
        self._input_hw = (h, w)
        outputs = self._session.get_outputs()
        if len(outputs) < 2:
            raise ValueError(f"{path}: expected simcc_x and simcc_y outputs, got {[o.name for o in outputs]}")
        self._output_names = [outputs[0].name, outputs[1].name]
        self._detector = HaarFaceDetector(multi_face=multi_face)
        self.model_path = path

    def detect(self, frame_rgb: np.ndarray) -> np.ndarray | None:
        face = self._detector.detect(frame_rgb)
        if face is None:
            return None
        return self.landmarks_in_box(frame_rgb, face)

    def landmarks_in_box(self, frame_rgb: np.ndarray, face_box: tuple[int, int, int, int]) -> np.ndarray:
        h_in, w_in = self._input_hw
        centre, scale = _person_box_from_face(face_box, w_in / h_in)
        m = _affine_to_input(centre, scale, (w_in, h_in))
        crop = cv2.warpAffine(np.ascontiguousarray(frame_rgb), m, (w_in, h_in), flags=cv2.INTER_LINEAR)
        x = (crop.astype(np.float32) - PIXEL_MEAN) / PIXEL_STD
        x = np.ascontiguousarray(x.transpose(2, 0, 1)[None])
        simcc_x, simcc_y = self._session.run(self._output_names, {self._input_name: x})
        pts_in = decode_simcc(simcc_x[0], simcc_y[0])[FACE_KPT_SLICE]
        # Input pixels -> frame pixels: invert the scale-and-shift affine.
        pts = (pts_in - m[:, 2]) / np.array([m[0, 0], m[1, 1]])
        return _clip_points(pts, frame_rgb.shape[1], frame_rgb.shape[0])


def decode_simcc(simcc_x: np.ndarray, simcc_y: np.ndarray, split_ratio: float = DWPOSE_SPLIT_RATIO) -> np.ndarray:
    """(K, Wx), (K, Wy) SimCC logits -> (K, 2) points in model-input pixels."""
    xs = np.argmax(simcc_x, axis=-1).astype(np.float64)
    ys = np.argmax(simcc_y, axis=-1).astype(np.float64)
    return np.stack([xs, ys], axis=-1) / split_ratio


def find_dwpose(model_dir: str | Path) -> Path:
    from musetalk.weights import locate, model_path

    found = locate(model_dir, "dwpose")
    if found is not None:
        return found
    raise FileNotFoundError(
        f"DWPose landmark model not found: expected {model_path(Path(model_dir), 'dwpose')} "
        f"(run `lipsync models download`, or set model.landmarks = \"opencv\" for the "
        "lower-quality fallback)"
    )


def make_landmarker(kind: str, model_dir: str | Path, *, multi_face: str = "largest") -> Landmarker:
    """"onnx" (DWPose, required), "opencv" (fallback), "auto" (DWPose when installed)."""
    if kind == "onnx":
        return OnnxLandmarker(model_dir, multi_face=multi_face)
    if kind == "opencv":
        return HaarTemplateLandmarker(multi_face=multi_face)
    if kind == "auto":
        try:
            return OnnxLandmarker(model_dir, multi_face=multi_face)
        except FileNotFoundError:
            return HaarTemplateLandmarker(multi_face=multi_face)
    raise ValueError(f"unknown landmarker {kind!r}: use 'auto', 'onnx' or 'opencv'")


def write_tiny_dwpose_onnx(path: str | Path, seed: int = 0) -> Path:
    """A tiny random model with DWPose's real I/O signature, for tests.

    input [1, 3, 384, 288] float32 -> simcc_x [1, 133, 576], simcc_y [1, 133, 768] float32.
    Global pooling + one linear layer per axis: the outputs depend on the image, so a
    wrong normalisation or layout still runs but changes the result.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    h, w = DWPOSE_INPUT_HW
    k = DWPOSE_KEYPOINTS
    wx, wy = int(w * DWPOSE_SPLIT_RATIO), int(h * DWPOSE_SPLIT_RATIO)
    inits = [
        numpy_helper.from_array(rng.standard_normal((3, k * wx)).astype(np.float32), "w_x"),
        numpy_helper.from_array(rng.standard_normal((3, k * wy)).astype(np.float32), "w_y"),
        numpy_helper.from_array(np.array([1, k, wx], dtype=np.int64), "shape_x"),
        numpy_helper.from_array(np.array([1, k, wy], dtype=np.int64), "shape_y"),
    ]
    nodes = [
        helper.make_node("GlobalAveragePool", ["input"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
        helper.make_node("MatMul", ["flat", "w_x"], ["lin_x"]),
        helper.make_node("MatMul", ["flat", "w_y"], ["lin_y"]),
        helper.make_node("Reshape", ["lin_x", "shape_x"], ["simcc_x"]),
        helper.make_node("Reshape", ["lin_y", "shape_y"], ["simcc_y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_dwpose",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, h, w])],
        [
            helper.make_tensor_value_info("simcc_x", TensorProto.FLOAT, [1, k, wx]),
            helper.make_tensor_value_info("simcc_y", TensorProto.FLOAT, [1, k, wy]),
        ],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


class PrecomputedLandmarker:
    """Replays landmarks computed earlier, one frame per call, in order: for packaged
    avatars that ship their landmarks (no detector needed where they are prepared)."""

    def __init__(self, landmarks: np.ndarray, source: str) -> None:
        if landmarks.ndim != 3 or landmarks.shape[1:] != (68, 2):
            raise ValueError(f"precomputed landmarks must be (N, 68, 2), got {landmarks.shape}")
        self.landmarks = landmarks
        self.quality = f"precomputed ({source})"
        self._next = 0

    def detect(self, frame_rgb: np.ndarray) -> np.ndarray | None:
        if self._next >= len(self.landmarks):
            raise ValueError(
                f"precomputed landmarks hold {len(self.landmarks)} frames; the video has more"
            )
        lm = self.landmarks[self._next]
        self._next += 1
        return lm.astype(np.float64)
