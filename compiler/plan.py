"""Moved to kvc.tools.plan; this re-export serves kvc/cli/plan_cmd.py until it imports the new home."""
from kvc.tools.plan import (  # noqa: F401
    PlanRequest,
    make_plan,
    parse_bandwidth,
    parse_memory,
    parse_weights_dtype,
    plan_table,
    plan_to_dict,
)
