"""`bnport score`: onnxruntime verification scoring of a run's snapshots (or any ONNX files and MODEL specs) over
face-verification benchmarks, the selection rule, and the handoff bundle."""
from bnport.score.exports import Candidate, ExportSettings
from bnport.score.scoring import ScoreResult, command_line, score

__all__ = ["Candidate", "ExportSettings", "ScoreResult", "command_line", "score"]
