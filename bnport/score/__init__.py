"""The score stage: onnxruntime verification scoring of a run's snapshots (or any ONNX files and MODEL specs) over
face-verification benchmarks (`scoring`, as `ScoreSettings` say), the candidates and their files (`candidates`), the
benchmarks (`bench`), the decode cache (`cache`), embeddings (`embed`), metrics (`metrics`), the selection rule
(`select`), the table (`table`, `format`) and the handoff bundle (`handoff`). Imports every earlier stage."""
from bnport.lazy import lazy_exports

__all__, __getattr__ = lazy_exports(__name__, {
    "Candidate": "bnport.score.candidates",
    "ScoreResult": "bnport.score.scoring",
    "ScoreSettings": "bnport.score.settings",
    "command_line": "bnport.score.scoring",
    "score": "bnport.score.scoring",
})
