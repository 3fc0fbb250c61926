"""Face analysis for DynamicID: detection, landmarks, identity embeddings, head pose.

Backends (``get_analyzer(name, **kwargs)``): ``"insightface"`` (buffalo_l packs, 512-d ArcFace, 106 landmarks —
what DynamicID's checkpoints were trained with) and ``"dlib"`` (real weights that install offline, 128-d,
68 landmarks). Both need the ``[faces]`` extra, imported only when a backend is built. Other backends plug in
with ``register_backend``.
"""
from .analyzer import (
    Face,
    FaceAnalysisError,
    FaceAnalyzer,
    MultipleFacesError,
    MultipleFacesWarning,
    NoFaceError,
    available_backends,
    get_analyzer,
    largest_face,
    reference_face,
    register_backend,
    select_reference,
    ARCFACE_TEMPLATE,
    EXPRESSIONS,
    align_face,
    arcface_transform,
    auto_face_prompt,
    landmark_raster,
    raster_from_image,
    raster_from_landmarks,
    raster_to_image,
    similarity_transform,
)
from .identity import (
    COSINE,
    DLIB_EUCLIDEAN,
    IdentityMetric,
    identity_metric,
    identity_similarity,
    identity_vector,
    same_person,
)
from dynamicid_jax.file_io import ImageLike, load_rgb
from .pose import estimate_pose, kps_from_68

__all__ = [
    "Face", "FaceAnalyzer", "FaceAnalysisError", "NoFaceError", "MultipleFacesError", "MultipleFacesWarning",
    "register_backend", "get_analyzer", "available_backends", "reference_face", "select_reference",
    "largest_face", "ImageLike", "load_rgb",
    "ARCFACE_TEMPLATE", "similarity_transform", "arcface_transform", "align_face",
    "raster_from_landmarks", "landmark_raster", "raster_from_image", "raster_to_image",
    "EXPRESSIONS", "auto_face_prompt", "estimate_pose", "kps_from_68",
    "IdentityMetric", "COSINE", "DLIB_EUCLIDEAN", "identity_metric", "identity_vector", "identity_similarity",
    "same_person",
]
