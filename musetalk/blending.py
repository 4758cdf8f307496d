"""Crop boxes and blend masks of MuseTalk 1.5: pure numpy/OpenCV, testable on the CPU.

Geometry follows the reference preparation (``get_landmark_and_bbox`` +
``get_image_prepare_material`` with ``expand=1.5``, ``upper_boundary_ratio=0.5``):

* face box: x from the landmarks' min/max, ``y2 = max y + extra_margin``,
  ``y1 = lm[29].y - (max y - lm[29].y)`` (the nose bridge is the crop's middle row);
* blend box: a square of side ``2 * int(max(w, h) // 2 * expand)`` around the face box
  centre;
* mask: computed on that full square (outside the frame counts as black, as PIL's
  ``crop`` pads), kept inside the face box and below the square's middle row, then
  Gaussian-blurred with kernel ``int(0.1 * side // 2 * 2) + 1``.

``PreparedAvatar`` stores blend boxes clipped to the frame; :func:`clip_square` cuts the
square's mask to the same region so that the engine never indexes outside the frame.
"""

from __future__ import annotations

import cv2
import numpy as np

from musetalk.types import FACE_SIZE

Box = tuple[int, int, int, int]

# CelebAMask-HQ labels of the BiSeNet face parser (79999_iter.pth).
LABEL_SKIN = 1
LABEL_NOSE = 10
LABEL_MOUTH = 11
LABEL_UPPER_LIP = 12
LABEL_LOWER_LIP = 13

PARSING_SIZE = 512  # the parser runs on 512x512 crops; cheek widths are in these pixels

# iBUG 68-point indices.
NOSE_BRIDGE_LOW = 29
JAW = slice(0, 17)
NOSE_LOWER = [30, 31, 32, 33, 34, 35]
OUTER_LIPS = slice(48, 60)


def face_box_from_landmarks(
    lm68: np.ndarray, frame_w: int, frame_h: int, extra_margin: int = 10
) -> Box:
    """The region of the frame that the 256x256 face crop maps to (exclusive ends).

    Landmarks are truncated to integers first, as the reference does, so that boxes
    from the same points are identical to its boxes.
    """
    lm = np.asarray(lm68)
    if lm.shape != (68, 2):
        raise ValueError(f"expected 68x2 landmarks, got shape {lm.shape}")
    lm = lm.astype(np.int32)
    mid_y = int(lm[NOSE_BRIDGE_LOW, 1])
    max_y = int(lm[:, 1].max())
    y1 = mid_y - (max_y - mid_y)
    y2 = max_y + extra_margin
    x1 = int(lm[:, 0].min())
    x2 = int(lm[:, 0].max())
    box = _clip_box((x1, y1, x2, y2), frame_w, frame_h)
    if box[2] - box[0] < 2 or box[3] - box[1] < 2:
        raise ValueError(f"degenerate face box {box} from landmarks (frame {frame_w}x{frame_h})")
    return box


def _clip_box(box: Box, frame_w: int, frame_h: int) -> Box:
    x1, y1, x2, y2 = (int(v) for v in box)
    return (max(0, x1), max(0, y1), min(frame_w, x2), min(frame_h, y2))


def smooth_boxes(
    boxes: np.ndarray,
    frame_w: int,
    frame_h: int,
    *,
    window: int = 5,
    max_shrink: float = 0.02,
) -> np.ndarray:
    """Temporal smoothing of face boxes against landmark jitter.

    Centres and sizes get a centred moving average over ``window`` frames. The ends
    are padded symmetrically, which is exactly what ping-pong playback shows (frame
    N-1 is followed by N-1, N-2, ...), so the loop point gets no jump either. A
    smoothed size never drops below ``(1 - max_shrink)`` of the raw size: averaging
    must not cut the chin or the mouth off a frame whose box was larger than its
    neighbours'. Returns int32 (N, 4) boxes clipped to the frame.
    """
    b = np.asarray(boxes, dtype=np.float64)
    if b.ndim != 2 or b.shape[1] != 4:
        raise ValueError(f"expected (N, 4) boxes, got shape {b.shape}")
    n = b.shape[0]
    if n == 0 or window <= 1:
        return np.array([_clip_box(tuple(x), frame_w, frame_h) for x in b], dtype=np.int32).reshape(-1, 4)
    half = window // 2
    centre = np.stack([(b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2], axis=1)
    size = np.stack([b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]], axis=1)
    centre_s = _moving_average(centre, half)
    size_s = np.maximum(_moving_average(size, half), size * (1.0 - max_shrink))
    out = np.empty((n, 4), dtype=np.int32)
    for i in range(n):
        cx, cy = centre_s[i]
        w, h = size_s[i]
        box = (
            int(round(cx - w / 2)),
            int(round(cy - h / 2)),
            int(round(cx + w / 2)),
            int(round(cy + h / 2)),
        )
        out[i] = _clip_box(box, frame_w, frame_h)
    return out


def _moving_average(x: np.ndarray, half: int) -> np.ndarray:
    n = x.shape[0]
    # Symmetric padding needs half <= n; repeat the sequence's mirror if it is short.
    padded = np.pad(x, ((half, half), (0, 0)), mode="symmetric") if half <= n else np.concatenate(
        [np.repeat(x[:1], half, 0), x, np.repeat(x[-1:], half, 0)]
    )
    kernel = np.ones(2 * half + 1) / (2 * half + 1)
    return np.stack([np.convolve(padded[:, j], kernel, mode="valid") for j in range(x.shape[1])], axis=1)


def blend_square(face_box: Box, expand: float = 1.5) -> Box:
    """The reference's unclipped square crop box around a face box (may leave the frame)."""
    x1, y1, x2, y2 = face_box
    xc, yc = (x1 + x2) // 2, (y1 + y2) // 2
    s = int(max(x2 - x1, y2 - y1) // 2 * expand)
    return (xc - s, yc - s, xc + s, yc + s)


def blend_box(face_box: Box, frame_w: int, frame_h: int, expand: float = 1.5) -> Box:
    """The blend square clipped to the frame: the region whose pixels the mask mixes."""
    return _clip_box(blend_square(face_box, expand), frame_w, frame_h)


def crop_square(frame: np.ndarray, square: Box) -> np.ndarray:
    """Pixels of ``square`` from ``frame``; parts outside the frame are black (PIL crop)."""
    x1, y1, x2, y2 = square
    h, w = frame.shape[:2]
    out = np.zeros((y2 - y1, x2 - x1) + frame.shape[2:], dtype=frame.dtype)
    cx1, cy1, cx2, cy2 = _clip_box(square, w, h)
    if cx2 > cx1 and cy2 > cy1:
        out[cy1 - y1 : cy2 - y1, cx1 - x1 : cx2 - x1] = frame[cy1:cy2, cx1:cx2]
    return out


def clip_square(mask_square: np.ndarray, square: Box, frame_w: int, frame_h: int) -> tuple[Box, np.ndarray]:
    """Cut a mask computed on the full blend square down to the clipped blend box."""
    x1, y1, _, _ = square
    box = _clip_box(square, frame_w, frame_h)
    bx1, by1, bx2, by2 = box
    return box, np.ascontiguousarray(mask_square[by1 - y1 : by2 - y1, bx1 - x1 : bx2 - x1])


def blur_kernel_size(side: int) -> int:
    return int(0.1 * side // 2 * 2) + 1


def _cone_kernel(cone_height: int = 21, tail_height: int = 12) -> np.ndarray:
    """Structuring element of the jaw dilation: a downward widening cone on a stem.

    The rows above the anchor are empty, so the dilation only grows skin where there
    is skin below: the chin line moves down, the forehead does not grow.
    """
    size = cone_height + tail_height
    k = np.zeros((size, size), dtype=np.uint8)
    c = size // 2
    for row in range(cone_height // 2, cone_height):
        half = row - cone_height // 2
        k[row, c - half : c + half + 1] = 1
    base_half = int(k[cone_height - 1].sum()) // 2
    k[cone_height:, max(0, c - base_half) : min(size, c + base_half + 1)] = 1
    return k


_CONE = _cone_kernel()
_CHEEK_ERODE = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (35, 3))


def _cheek_region(cheek_width: int) -> np.ndarray:
    """255 on both cheeks (outside centre +- cheek_width), 0 over the chin column."""
    m = np.zeros((PARSING_SIZE, PARSING_SIZE), dtype=np.uint8)
    c = PARSING_SIZE // 2
    # cv2.rectangle fills both end columns inclusively, as the reference's mask does.
    m[:, : max(0, c - cheek_width + 1)] = 255
    m[:, min(PARSING_SIZE, c + cheek_width) :] = 255
    return m


def region_from_parsing(labels: np.ndarray, mode: str = "jaw", cheek_width: int = 90) -> np.ndarray:
    """Binary 0/255 region from 512x512 parsing labels, before any box logic.

    "jaw": skin dilated downwards by the cone, eroded on the cheeks only, nose
    removed, lips and mouth added. "raw": skin + lips + mouth.
    """
    labels = np.asarray(labels)
    if labels.shape != (PARSING_SIZE, PARSING_SIZE):
        raise ValueError(f"expected {PARSING_SIZE}x{PARSING_SIZE} labels, got {labels.shape}")
    lips_mouth = np.isin(labels, [LABEL_MOUTH, LABEL_UPPER_LIP, LABEL_LOWER_LIP])
    if mode == "raw":
        keep = (labels == LABEL_SKIN) | lips_mouth
    elif mode == "jaw":
        skin = (labels == LABEL_SKIN).astype(np.uint8) * 255
        dilated = cv2.dilate(skin, _CONE, iterations=1)
        eroded = cv2.erode(dilated, _CHEEK_ERODE, iterations=2)
        cheeks = _cheek_region(cheek_width)
        region = cv2.bitwise_or(cv2.bitwise_and(eroded, cheeks), cv2.bitwise_and(dilated, cv2.bitwise_not(cheeks)))
        keep = ((region == 255) & (labels != LABEL_NOSE)) | lips_mouth
    else:
        raise ValueError(f"unknown parsing mode {mode!r}: use 'jaw' or 'raw'")
    return keep.astype(np.uint8) * 255


def finish_mask(region_square: np.ndarray, face_box_rel: Box, upper_boundary_ratio: float = 0.5) -> np.ndarray:
    """Face-box restriction, lower part only, then the soft edge: the reference's last steps.

    ``region_square`` is a 0..255 mask over the whole blend square; ``face_box_rel`` is
    the face box in the square's coordinates.
    """
    side_h, side_w = region_square.shape
    fx1, fy1, fx2, fy2 = face_box_rel
    kept = np.zeros_like(region_square, dtype=np.uint8)
    cx1, cy1, cx2, cy2 = max(0, fx1), max(0, fy1), min(side_w, fx2), min(side_h, fy2)
    kept[cy1:cy2, cx1:cx2] = region_square[cy1:cy2, cx1:cx2]
    kept[: int(side_h * upper_boundary_ratio)] = 0
    k = blur_kernel_size(side_w)
    return cv2.GaussianBlur(kept, (k, k), 0)


def mask_from_parsing(
    labels: np.ndarray,
    square_side: int,
    face_box_rel: Box,
    *,
    mode: str = "jaw",
    cheek_width: int = 90,
    upper_boundary_ratio: float = 0.5,
) -> np.ndarray:
    """Final uint8 blend mask over the full square from the parser's 512x512 labels."""
    region = region_from_parsing(labels, mode=mode, cheek_width=cheek_width)
    # The reference resizes the parsing image with PIL's default (bicubic) filter.
    region = cv2.resize(region, (square_side, square_side), interpolation=cv2.INTER_CUBIC)
    return finish_mask(region, face_box_rel, upper_boundary_ratio)


def mask_from_landmarks(
    lm68_rel: np.ndarray,
    square_side: int,
    face_box_rel: Box | None = None,
    *,
    upper_boundary_ratio: float = 0.5,
) -> np.ndarray:
    """Fallback blend mask when no face-parsing model is installed.

    The jaw line closed across the face approximates the parser's skin region below
    the eyes; the lower nose is cut out (the jaw mode excludes the nose) and the lips
    are added. Landmarks are in the square's coordinates. Then the same face-box
    restriction, lower half and blur as the parsing mask.
    """
    lm = np.asarray(lm68_rel, dtype=np.float64)
    if lm.shape != (68, 2):
        raise ValueError(f"expected 68x2 landmarks, got shape {lm.shape}")
    region = np.zeros((square_side, square_side), dtype=np.uint8)
    pts = np.round(lm).astype(np.int32)
    cv2.fillPoly(region, [pts[JAW]], 255)
    cv2.fillConvexPoly(region, cv2.convexHull(pts[NOSE_LOWER]), 0)
    cv2.fillConvexPoly(region, cv2.convexHull(pts[OUTER_LIPS]), 255)
    if face_box_rel is None:
        face_box_rel = (0, 0, square_side, square_side)
    return finish_mask(region, face_box_rel, upper_boundary_ratio)


def crop_face(frame: np.ndarray, face_box: Box) -> np.ndarray:
    """The 256x256 RGB model input for one frame (LANCZOS4, as the reference)."""
    x1, y1, x2, y2 = face_box
    crop = frame[y1:y2, x1:x2]
    if crop.size == 0:
        raise ValueError(f"empty face crop for box {face_box} in a {frame.shape[1]}x{frame.shape[0]} frame")
    return cv2.resize(crop, (FACE_SIZE, FACE_SIZE), interpolation=cv2.INTER_LANCZOS4)


def paste_face(
    frame: np.ndarray,
    face_rgb: np.ndarray,
    face_box: Box,
    blend_box_: Box,
    mask: np.ndarray,
    blend: float = 1.0,
) -> np.ndarray:
    """Reference paste-back on the CPU: generated face into the face box, mixed by the mask.

    Used by tests and as the specification of the engine's GPU paste. Returns a new frame.
    """
    x1, y1, x2, y2 = face_box
    bx1, by1, bx2, by2 = blend_box_
    out = frame.copy()
    region = frame[by1:by2, bx1:bx2].astype(np.float32)
    composed = region.copy()
    face = cv2.resize(face_rgb, (x2 - x1, y2 - y1), interpolation=cv2.INTER_LINEAR).astype(np.float32)
    composed[y1 - by1 : y2 - by1, x1 - bx1 : x2 - bx1] = face
    alpha = (mask.astype(np.float32) / 255.0 * float(blend))[..., None]
    out[by1:by2, bx1:bx2] = np.clip(composed * alpha + region * (1 - alpha) + 0.5, 0, 255).astype(np.uint8)
    return out
