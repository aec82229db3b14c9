"""--dump-passes for the TVM build, numbered after the ONNX pass dumps in the same directory (those
end with the graphs each decode entry imports, NN_lower_tvm_<entry>_entry.onnx): the Relax module as
TVMScript text after import and after each phase of the Relax pipeline (NN_relax_import.txt,
NN_relax_legalize_and_fuse.txt, ...)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import tvm

PREFIX = "relax_"


@dataclass
class RelaxDump:
    directory: Path
    next_index: int  # the number of the first Relax dump (one after the last ONNX dump)
    written: list[Path] = field(default_factory=list)

    def write(self, phase: str, mod: tvm.IRModule) -> Path:
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"{self.next_index:02d}_{PREFIX}{phase}.txt"
        path.write_text(mod.script(show_meta=False))
        self.next_index += 1
        self.written.append(path)
        return path

    def after(self, phase: str) -> tvm.transform.Pass:
        """A module pass that writes the module and returns it unchanged."""

        @tvm.transform.module_pass(opt_level=0, name=f"KvcDump_{phase}")
        def dump(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
            self.write(phase, mod)
            return mod

        return dump
