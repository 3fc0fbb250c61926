"""SynthFace's face models, the world's stand-ins for insightface: the recogniser (:mod:`.recognizer`, the world's
"ArcFace"), the detector and landmarker (:mod:`.detector`) and the ``synthetic`` face-analysis backend built on them
(:mod:`.backend`; registered with :func:`dynamicid_jax.faces.register_backend` by :mod:`synthface.plugin`, which
importing this package runs)."""
