"""kvc.tools: tools around the compiler, not compilation: the KV-cache memory planner (`kvc plan`) and
static fp8 scale calibration (`kvc calibrate`)."""
