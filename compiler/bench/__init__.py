"""`kvc bench`: prefill and decode speed against context depth for the kvc engines and baselines
(PyTorch eager and ONNX Runtime on the concat export) on the same weights, with the bytes each
decode step must move and the fraction of the machine's measured bandwidth that achieves."""
from kvc.compiler.bench.options import BenchConfig, EngineName, parse_choice_list, parse_engines, parse_int_list
from kvc.compiler.bench.run import BenchResult, run_bench

__all__ = ["BenchConfig", "BenchResult", "EngineName", "parse_choice_list", "parse_engines", "parse_int_list",
           "run_bench"]
