"""The report stage: what the plots show, computed from a run (`data`), and the PNG plots and report.md drawn from it
(`write`). Imports every earlier stage's results, never the other way round."""
from bnport.lazy import lazy_exports

__all__, __getattr__ = lazy_exports(__name__, {
    "ReportData": "bnport.report.data",
    "report_data": "bnport.report.data",
    "write_report": "bnport.report.write",
})
