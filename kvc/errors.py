"""User-facing errors: each names the problem and the fix; the CLI prints one line and exits 1."""


class KvcError(Exception):
    """An error caused by the user's input, reported without a traceback."""


class CheckpointError(KvcError):
    """A model checkpoint or config is missing, malformed or unsupported."""


class GraphError(KvcError):
    """An ONNX graph does not have the structure a pass or engine needs."""


class ArtifactError(KvcError):
    """A compiled artifact is malformed, tampered with or built by another version."""


class GenerationError(KvcError):
    """Invalid generation request (sampling values, prompt over capacity, ...)."""
