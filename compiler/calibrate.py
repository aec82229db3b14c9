"""Moved to kvc.tools.calibrate; this re-export serves kvc/cli/calibrate_cmd.py until it imports the new home."""
from kvc.tools.calibrate import CalibrationResult, calibrate_fp8  # noqa: F401
