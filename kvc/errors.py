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


class OutputError(KvcError):
    """An output path kvc may not or cannot write (exists, not kvc's, read-only, invalid)."""


class Interrupted(KeyboardInterrupt):
    """SIGINT, SIGTERM or SIGHUP arrived while kvc was writing: raised to unwind the atomic-write blocks
    (their staging data is removed); the CLI exits with 128 + signum."""

    def __init__(self, signum: int):
        import signal

        self.signum = signum
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
